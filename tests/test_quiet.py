"""A command prints nothing the user can do nothing about: bitsandbytes' kernel notice (dropped by `hfrecipes.quiet`)
and transformers' deprecation of `gradient_checkpointing` (5.24 and newer; our configs pass the value under its new
name, `stages.common.checkpointing_under_its_new_name`). A command as the user runs it, in a process of its own,
prints neither: `test_pretrain.py::test_cli_lists_and_checks_recipes`."""

import logging
import warnings
from types import SimpleNamespace


def test_the_filter_drops_that_message_only():
    import hfrecipes  # noqa: F401  (installs the filters)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels")
        logger.warning("Something else went wrong: %s", "x")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in seen] == ["Something else went wrong: x"]


def test_checkpointing_moves_to_its_new_name_where_transformers_has_it():
    from hfrecipes.stages.common import checkpointing_under_its_new_name

    new = SimpleNamespace(
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        activation_checkpointing=None,
        activation_checkpointing_kwargs=None,
    )
    checkpointing_under_its_new_name(new)
    assert new.activation_checkpointing is True and new.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert new.gradient_checkpointing is None and new.gradient_checkpointing_kwargs is None
    both = SimpleNamespace(gradient_checkpointing=True, activation_checkpointing=False)
    both.gradient_checkpointing_kwargs = both.activation_checkpointing_kwargs = None
    checkpointing_under_its_new_name(both)
    assert both.activation_checkpointing is False  # the new name, set, wins
    old = SimpleNamespace(gradient_checkpointing=True, gradient_checkpointing_kwargs=None)
    checkpointing_under_its_new_name(old)
    assert old.gradient_checkpointing is True  # a transformers without the new name keeps the old one


def test_the_installed_transformers_reads_the_recipe_value_without_a_warning(tmp_path):
    from hfrecipes.stages.sft import SFTConfig

    for value in (None, True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            args = {} if value is None else {"gradient_checkpointing": value}
            config = SFTConfig(output_dir=str(tmp_path), **args)
        assert config.gradient_checkpointing is bool(value)  # FineTuneDefaults: off unless the recipe says
        assert not [w for w in caught if "gradient_checkpointing" in str(w.message)], [str(w.message) for w in caught]

"""Training overhead: the sft, reward and dpo stages' step time against a hand-written PyTorch loop doing the same
work on the same batches, in the same run; and each side's model FLOP utilisation against the measured matmul rate.

    python bench/training_overhead.py                      # sft, reward, dpo (+ fused-head rows), ~2-4 min
    python bench/training_overhead.py --stages sft --steps 40 --repeats 3

Each stage runs from its bundled tiny recipe (parents: a few-step tiny pretrain and SFT made first). A callback
slipped into the stage records every step's end and, right there, lets a hand-written loop take one step of its own:
a fresh copy of the same parent, on batches drawn before training from the stage's own dataloader (so the loop does
none of the stage's data work), with AdamW and gradient clipping like the stage. The two sides take turns step by
step, so a burst of load from other processes hits both. The losses:
- sft: masked next-token cross-entropy on the collator's labels;
- reward: Bradley-Terry, -log sigmoid(score(chosen) - score(rejected)), scores from a one-output head;
- dpo: sigmoid DPO against a frozen reference copy (reference log-probs computed under no_grad every step).
TRL's SFT and DPO trainers compute log-probabilities through their own fused LM head (in vocabulary tiles, each tile
recomputed in the backward pass, with entropy and top-1 for the logs). Without Triton (here) the stages default to
`logits_lm_head`: the same fields from one plain matmul. The `-fusedhead` rows run the stage with TRL's head
(`logits_lm_head=False`) against a loop that uses that head too, so they show the stage's overhead with the head
GPUs use, and, set beside the plain rows, what the head costs on this machine.
Steady-state seconds per step are medians of the step times after the first `--skip` steps, over `--repeats` runs.
The 10th percentile of all steps of a side is shown too: other processes only ever add time, so it compares the
quiet moments of both sides.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from bench.common import matmul_rate, median, parents, quantile, timed_steps

LR = 1e-4


class HandLoop:
    """A plain PyTorch loop on a fresh copy of the parent: forward, the stage's loss, backward, clip, AdamW,
    zero_grad. It takes one step each time the stage has taken one, on a batch from the stage's own dataloader."""

    def __init__(self, stage: str, parent: str, fused_head: bool = False):
        self.stage, self.parent, self.fused_head = stage, parent, fused_head
        self.seconds: list[float] = []

    def begin(self, train_dataloader, args) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from hfrecipes.modeling import load_tokenizer

        if self.stage == "reward":
            self.model = AutoModelForSequenceClassification.from_pretrained(self.parent, num_labels=1)
            self.model.config.pad_token_id = load_tokenizer(self.parent).pad_token_id
        else:
            self.model = AutoModelForCausalLM.from_pretrained(self.parent)
        self.ref = AutoModelForCausalLM.from_pretrained(self.parent).eval() if self.stage == "dpo" else None
        if self.fused_head:  # TRL's heads: log-probs (SFT: with entropy and top-1) of the trained positions, in tiles
            from trl.trainer.utils import add_fused_lm_head

            if self.stage == "sft":
                add_fused_lm_head(self.model, outputs=("log_probs", "entropy", "is_top1"))
            else:
                add_fused_lm_head(self.model)
                add_fused_lm_head(self.ref)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.0)
        self.beta = getattr(args, "beta", 0.1)
        # the stage's collator and data; drawn through torch's own iterator, so accelerate's dataloader state (which
        # the stage is using) is left alone
        batches = torch.utils.data.DataLoader.__iter__(train_dataloader)
        self.batches = [next(batches) for _ in range(args.max_steps)]
        self.n = sum(p.numel() for p in self.model.parameters())
        if self.stage == "reward":  # no LM head: the embedding is only a lookup
            self.n -= self.model.get_input_embeddings().weight.numel()

    def logps(self, m, b):
        import torch

        if self.fused_head:
            labels = b["input_ids"].masked_fill(b["completion_mask"] == 0, -100)
            ids, mask = b["input_ids"], b["attention_mask"]
            return m(
                input_ids=ids, attention_mask=mask, labels=labels, use_cache=False, fused_lm_head=True
            ).log_probs.sum(-1)
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits[:, :-1]
        tok = torch.gather(logits.log_softmax(-1), 2, b["input_ids"][:, 1:, None]).squeeze(2)
        return (tok * b["completion_mask"][:, 1:]).sum(-1)

    def step(self, i: int) -> None:
        import torch
        import torch.nn.functional as F

        start = time.perf_counter()
        b = self.batches[(i - 1) % len(self.batches)]
        if self.stage == "sft" and self.fused_head:
            out = self.model(**b, use_cache=False, fused_lm_head=True)
            loss = -out.log_probs.sum() / out.label_mask.sum()
        elif self.stage == "sft":
            loss = self.model(**b, use_cache=False).loss
        elif self.stage == "reward":
            scores = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            chosen, rejected = scores.squeeze(-1).chunk(2)
            loss = -F.logsigmoid(chosen - rejected).mean()
        else:
            with torch.no_grad():
                ref_c, ref_r = self.logps(self.ref, b).chunk(2)
            pol_c, pol_r = self.logps(self.model, b).chunk(2)
            loss = -F.logsigmoid(self.beta * ((pol_c - ref_c) - (pol_r - ref_r))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.seconds.append(time.perf_counter() - start)


def run_pair(name: str, parent: str, steps: int, batch: int, workdir: str, i: int):
    """One stage run with the hand loop stepping in between its steps: the stage's step times and the loop."""
    import hfrecipes

    stage = name.split("-")[0]
    overrides = dict(
        model_name_or_path=parent,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=LR,
        warmup_steps=0,
        output_dir=f"{workdir}/{name}{i}",
        save_strategy="no",
        dataset_test_split="",
        report_to="none",
    )
    if stage == "dpo":
        overrides.update(loss_type=["sigmoid"], loss_weights=None)
    fused_head = name.endswith("-fusedhead")
    if stage != "reward":
        overrides.update(logits_lm_head=not fused_head)
    loop = HandLoop(stage, parent, fused_head=fused_head)
    with timed_steps(on_begin=loop.begin, after_step=loop.step) as times:
        getattr(hfrecipes, stage)(f"tiny/{stage}", **overrides)
    return times, loop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--stages",
        nargs="+",
        default=["sft", "sft-fusedhead", "reward", "dpo", "dpo-fusedhead"],
        help="sft-fusedhead, dpo-fusedhead: the stage with TRL's fused LM head against a loop that uses it too",
    )
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the medians")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pre, sft = parents(tmp)
        for stage in args.stages:
            parent = pre if stage.startswith("sft") else sft
            stage_s, loop_s, stage_all, loop_all, rates = [], [], [], [], []
            for i in range(args.repeats):
                times, loop = run_pair(stage, parent, args.steps, args.batch, tmp, i)
                stage_all += times.per_step(args.skip)
                loop_all += loop.seconds[args.skip + 1 :]
                stage_s.append(median(times.per_step(args.skip)))
                loop_s.append(median(loop.seconds[args.skip + 1 :]))
                rates.append(matmul_rate())
            tokens = median([float(b["attention_mask"].sum()) for b in loop.batches])
            rows.append((stage, stage_s, loop_s, quantile(stage_all, 0.1), quantile(loop_all, 0.1), tokens, loop.n))
    # noise from other processes only ever slows a measurement down, so the machine's rate is the best one seen
    rate = max(rates)

    print(
        f"tiny Llama stages, batch {args.batch}, {args.steps} steps (first {args.skip} skipped) x {args.repeats} "
        f"runs, stage and loop taking turns step by step; torch threads {args.threads}; measured fp32 matmul "
        f"{rate / 1e9:.1f} GFLOP/s"
    )
    print(
        f"{'stage':<15}{'stage s/step':>14}{'loop s/step':>13}{'stage/loop':>12}{'p10 ratio':>11}{'MFU stage':>11}"
        f"{'MFU loop':>10}{'tokens':>8}   per-run medians (stage | loop)"
    )
    summary = []
    for stage, ss, ls, s10, l10, tokens, n in rows:
        # training FLOPs per step: 6*N per token through the trained model, 2*N more for dpo's reference forward;
        # N counts the matmul weights (the input embedding is a lookup; a tied LM head is a matmul)
        flops = (6 + (2 if stage.startswith("dpo") else 0)) * n * tokens
        s, loop = median(ss), median(ls)
        summary.append(f"{stage} {s / loop:.2f}x (p10 {s10 / l10:.2f}x)")
        print(
            f"{stage:<15}{s:>14.4f}{loop:>13.4f}{s / loop:>11.2f}x{s10 / l10:>10.2f}x{flops / s / rate:>11.1%}"
            f"{flops / loop / rate:>10.1%}{tokens:>8.0f}   {[round(x, 3) for x in ss]} | {[round(x, 3) for x in ls]}"
        )
    print(
        f"summary: stage step time over the hand-written loop's, median (10th percentile of all steps): "
        f"{', '.join(summary)}; goal <= 1.10"
    )


if __name__ == "__main__":
    main()

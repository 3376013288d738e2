// Run a GGUF file in llama.cpp itself, through node-llama-cpp's prebuilt CPU binaries, and print what it did as JSON:
// greedy tokens and top logits for prompts given as token ids, its tokenizer's ids for texts, the special tokens it
// read, and chat conversations rendered by llama.cpp's own Jinja engine. `hfrecipes.llama_cpp` writes the request
// and compares the answer with transformers.
//
//     node hfrecipes/llama_cpp_check.mjs NODE_MODULES < request.json
//
// request: {"model": FILE, "prompts": [[id, ...]], "max_new_tokens": N, "top_logits": K, "texts": [str],
//           "chats": [[{"role", "content"}]], "threads": T}
// The binary is never built or downloaded here (build "never", skipDownload): without a prebuilt one for this
// platform the check fails with node-llama-cpp's NoBinaryFoundError instead of compiling llama.cpp.

import {readFileSync} from "node:fs";
import {createRequire} from "node:module";
import {join, resolve} from "node:path";
import {pathToFileURL} from "node:url";

const [nodeModules] = process.argv.slice(2);
const request = JSON.parse(readFileSync(0, "utf8"));
const require = createRequire(join(resolve(nodeModules), "/"));
const nlc = await import(pathToFileURL(require.resolve("node-llama-cpp")).href);
const version = JSON.parse(readFileSync(join(resolve(nodeModules), "node-llama-cpp", "package.json"), "utf8")).version;

const llama = await nlc.getLlama({
    gpu: false, // the CPU backend: the figures do not depend on a GPU's kernels, and no GPU package is needed
    build: "never",
    skipDownload: true,
    usePrebuiltBinaries: true,
    progressLogs: false,
    logLevel: "error",
    maxThreads: request.threads ?? 1,
});
const model = await llama.loadModel({modelPath: request.model, gpuLayers: 0});
const prompts = request.prompts ?? [];
const maxNew = request.max_new_tokens ?? 16;
const longest = Math.max(1, ...prompts.map((p) => p.length)) + maxNew;
const context = await model.createContext({
    contextSize: Math.min(model.trainContextSize, Math.max(32, longest)),
    batchSize: Math.max(32, longest),
    threads: request.threads ?? 1,
    sequences: 1,
});
const sequence = context.getSequence();
const top = request.top_logits ?? 5;
const next = {token: true, options: {temperature: 0}, logits: {filter: {tokens: [], includeTop: top}}};

const replies = [];
for (const prompt of prompts) {
    await sequence.clearHistory();
    const tokens = [], logits = [];
    let input = prompt.map((t, i) => (i === prompt.length - 1 ? [t, {generateNext: next}] : t));
    while (tokens.length < maxNew) {
        const out = await sequence.controlledEvaluate(input);
        const step = out[input.length - 1].next;
        tokens.push(step.token);
        logits.push([...step.logits.entries()]);
        input = [[step.token, {generateNext: next}]];
    }
    replies.push({tokens, logits});
}

// llama.cpp's own Jinja engine (the one llama-server and llama-cli use); node-llama-cpp's public chat wrapper renders
// with a JavaScript engine first, so the binding is called directly
let rendered = null;
const metadata = model.fileInfo.metadata;
const template = metadata?.tokenizer?.chat_template ?? null;
if (template != null && (request.chats ?? []).length > 0) {
    const engine = new llama._bindings.AddonJinjaRenderer(template);
    const text = (id) => (id == null ? "" : model.detokenize([id], true));
    const special = {bos_token: text(model.tokens.bos), eos_token: text(model.tokens.eos)};
    rendered = request.chats.map((messages) => engine.render({messages, add_generation_prompt: true, ...special}));
}

const eog = [...new Set([model.tokens.eos, model.tokens.eot].filter((t) => t != null))];
process.stdout.write(
    JSON.stringify({
        runtime: `node-llama-cpp ${version}`,
        llama_cpp: llama.llamaCppRelease.release,
        build: llama.buildType,
        backend: llama.gpu === false ? "cpu" : String(llama.gpu),
        system_info: llama.systemInfo.trim(),
        tokens: {bos: model.tokens.bos, eos: model.tokens.eos, eot: model.tokens.eot, end_of_generation: eog},
        add_bos: model.tokens.shouldPrependBosToken,
        chat_template: template,
        tokenized: (request.texts ?? []).map((t) => model.tokenize(t, true)),
        rendered,
        replies,
    }) + "\n",
);
await context.dispose();
await model.dispose();
await llama.dispose();

// moe_adapt's browser page: one exported GGUF in wllama (llama.cpp in WebAssembly), fully offline.
//
// Everything comes from the server that serves this page (python -m moe_adapt.export.web serve):
// the runtime from ./vendor/wllama/ (npm ci, never a CDN), the model from ./model.gguf.
// Query parameters: n (tokens per prompt, default 32), threads (default: wllama's choice, half the
// cores; 1 = single thread), n_ctx (default 512), letters=1 (tick "letters only"), autorun=1
// (generate for both prompts once loaded).
//
// "letters only" constrains sampling with a llama.cpp grammar to printable ASCII and the Arabic block.
// wllama 3.13 fails a completion whose bytes are not valid UTF-8 (its JSON encoder throws
// "invalid UTF-8 byte", surfacing as "Invalid typed array length"): a byte-level BPE model can emit
// a lone byte of a multi-byte character, which an untrained model (the tests') does at once.
//
// What the last run measured is written as JSON into <script id="results">; window.moeAdapt exposes
// generate() and nextTokens() for scripts (the browser test compares llama.cpp's greedy next token
// and log-probs with the HF model's through it).
import { Wllama, LogLevel } from './vendor/wllama/esm/index.js';

const LETTERS = 'root ::= [ -~\\n\\u0600-\\u06FF]*';
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const results = { status: 'loading', runs: [] };

function publish(patch) {
  Object.assign(results, patch);
  $('results').textContent = JSON.stringify(results);
}

function fail(err) {
  let message = err && err.message ? err.message : String(err);
  if (message.includes('Invalid typed array length')) {
    message += ' (wllama could not encode the output: bytes that are not valid UTF-8; tick "letters only")';
  }
  $('status').textContent = `error: ${message}`;
  publish({ status: 'error', error: message });
  console.error(err);
}

const wllama = new Wllama(
  { default: './vendor/wllama/esm/wasm/wllama.wasm' },
  { allowOffline: true, logger: { ...console, debug: () => {} } },
);
// compat mode would fetch another wasm build from a CDN: never (Chromium needs none)
wllama.setCompat(null);

async function load() {
  $('runtime').textContent = Wllama.getLibllamaVersion();
  $('status').textContent = 'downloading the model from this server…';
  const t0 = performance.now();
  const response = await fetch('./model.gguf');
  if (!response.ok) throw new Error(`GET model.gguf: HTTP ${response.status}`);
  const blob = await response.blob();
  $('status').textContent = `loading ${(blob.size / 2 ** 20).toFixed(2)} MiB into llama.cpp…`;
  const threads = params.has('threads') ? Number(params.get('threads')) : undefined;
  await wllama.loadModel([blob], {
    n_gpu_layers: 0, // CPU (WebAssembly SIMD); no WebGPU
    n_ctx: Number(params.get('n_ctx') || 512),
    n_threads: threads,
    seed: 0,
    log_level: LogLevel.WARN,
  });
  const info = wllama.getLoadedContextInfo();
  const meta = wllama.getModelMetadata().meta;
  $('threads').textContent = String(wllama.getNumThreads());
  publish({
    status: 'ready',
    load_seconds: (performance.now() - t0) / 1000,
    model_bytes: blob.size,
    runtime: 'wllama',
    llama_cpp: Wllama.getLibllamaVersion(),
    threads: wllama.getNumThreads(),
    multithread: wllama.isMultithread(),
    arch: meta['general.architecture'],
    n_vocab: info.n_vocab,
    n_layer: info.n_layer,
  });
  $('status').textContent = `ready (${meta['general.architecture']}, ${info.n_layer} layers)`;
}

/** Greedy generation of n tokens (EOS ignored so every run is n tokens long); tokens/s as measured
 * here (wall clock of the whole call, prompt included) and as llama.cpp reports (generation only). */
async function generate(prompt, n, letters = false) {
  const t0 = performance.now();
  const res = await wllama.createCompletion({
    prompt,
    max_tokens: n,
    temperature: 0,
    top_k: 1,
    seed: 0,
    ignore_eos: true,
    cache_prompt: false,
    ...(letters ? { grammar: LETTERS } : {}),
  });
  const seconds = (performance.now() - t0) / 1000;
  const tokens = res.usage ? res.usage.completion_tokens : n;
  const t = res.timings || {};
  return {
    prompt,
    text: res.choices[0].text,
    tokens,
    prompt_tokens: res.usage ? res.usage.prompt_tokens : null,
    seconds,
    tokens_per_s: tokens / seconds,
    llama_tokens_per_s: t.predicted_per_second ?? null,
    llama_prompt_tokens_per_s: t.prompt_per_second ?? null,
  };
}

/** llama.cpp's distribution of the token after `prompt` (a string or a list of token ids): its greedy
 * choice and the top `k` log-probs, as the completion endpoint reports them. */
async function nextTokens(prompt, k = 5) {
  const res = await wllama.createCompletion({
    prompt,
    max_tokens: 1,
    temperature: 0,
    top_k: 1,
    seed: 0,
    cache_prompt: false,
    logprobs: k,
  });
  return { text: res.choices[0].text, logprobs: res.choices[0].logprobs, raw: res };
}

async function runAll() {
  const n = Number(params.get('n') || $('n-predict').value);
  $('generate').disabled = true;
  publish({ status: 'generating' });
  const runs = [];
  try {
    for (const lang of ['ar', 'en']) {
      $('status').textContent = `generating (${lang})…`;
      const run = { lang, ...(await generate($(`prompt-${lang}`).value, n, $('letters').checked)) };
      $(`out-${lang}`).textContent = run.prompt + run.text;
      runs.push(run);
    }
  } catch (err) {
    fail(err);
    return;
  } finally {
    $('generate').disabled = false;
  }
  const tokens = runs.reduce((s, r) => s + r.tokens, 0);
  const seconds = runs.reduce((s, r) => s + r.seconds, 0);
  const speed = tokens / seconds;
  $('speed').textContent =
    `${speed.toFixed(1)} tokens/s (${tokens} tokens in ${seconds.toFixed(2)} s, prompts included); ` +
    runs.map((r) => `${r.lang}: llama.cpp ${(r.llama_tokens_per_s ?? 0).toFixed(1)} tokens/s`).join(', ');
  $('status').textContent = 'done';
  publish({ status: 'done', runs, tokens_per_s: speed, letters_only: $('letters').checked });
}

window.moeAdapt = { wllama, generate, nextTokens, runAll, results };
$('generate').addEventListener('click', runAll);
if (params.has('n')) $('n-predict').value = params.get('n');
if (params.get('letters') === '1') $('letters').checked = true;

load()
  .then(() => {
    $('generate').disabled = false;
    if (params.get('autorun') === '1') return runAll();
  })
  .catch(fail);

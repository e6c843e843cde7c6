// The FunGPT explorer page. Plain JavaScript, no libraries and no build step.
//
// It talks to the server it was loaded from (fungpt/serve.py):
//   GET  /api/info        -> run summary, config, limits           (header, selectors, config table)
//   GET  /api/metrics     -> loss curve rows                        (drawn as SVG)
//   POST /api/generate    -> server-sent events, one per new token  (streamed into #output)
//   POST /api/attention   -> (T, T) weights of one layer and head    (drawn on a <canvas>)
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  info: null,
  promptTokens: [],   // [{id, text}] the prompt as the model saw it
  gen: [],            // [{id, text, prob, top: [{id, text, prob}]}] generated tokens, in order
  selected: null,     // index into gen of the clicked token
  controller: null,   // AbortController of the running generation
  attnRequest: 0,     // number of the latest attention request: an older answer arriving late is dropped
  sampleStep: null,   // step of the checkpoint that generated the shown sample
  sampleModel: null,  // the server's name for those weights (see /api/info's "model")
  prompt: "",         // the prompt of the shown sample, as it was sent
  attn: null,         // the attention answer drawn on the heat map
  attnIndex: null,    // index into gen of the token that answer is for
  cursor: null,       // {i, j}: the heat map's cell under the keyboard's cursor
};

// Make whitespace visible where a token is shown on its own.
function visible(text) {
  if (text === "") return "∅";
  return text.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍");
}

// How a token is read out by a screen reader, in words: a lone "␣" is read as "open box", and punctuation or a
// leading space not at all (at a screen reader's usual settings "," says nothing, and " the" sounds as "the")
const CHAR_NAMES = {
  " ": "space", "\n": "newline", "\t": "tab", "\r": "carriage return", ",": "comma", ".": "period",
  "!": "exclamation mark", "?": "question mark", ":": "colon", ";": "semicolon", "'": "apostrophe", '"': "quote",
  "-": "dash", "&": "ampersand", "$": "dollar", "(": "open paren", ")": "close paren", "[": "open bracket",
  "]": "close bracket", "*": "star", "/": "slash", "_": "underscore", "#": "hash", "%": "percent", "@": "at",
};
function spoken(text) {
  if (text === "") return "part of a character";
  // (a control or format character has no name a screen reader says: its code point; any other, itself)
  const code = (c) => `U+${c.codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}`;
  const name = (c) => CHAR_NAMES[c] ?? (/\p{C}/u.test(c) ? code(c) : c);
  const chars = Array.from(text);
  if (chars.length === 1 || !/[\p{L}\p{N}]/u.test(text)) return chars.map(name).join(" ");  // "comma", "space newline"
  // a word: said as it is, with the whitespace around it in words ("space the", "ROMEO newline")
  const [, lead, word, trail] = text.match(/^(\s*)([\s\S]*?)(\s*)$/);
  const said = word.replace(/\p{C}/gu, (c) => ` ${code(c)} `).trim();
  return [...Array.from(lead, name), said, ...Array.from(trail, name)].join(" ");
}

// A token as the page shows it (whitespace made visible) for the eyes, and in words for a screen reader
function tokenText(text, quoted = true) {
  const both = document.createElement("span");
  const shown = document.createElement("span");
  shown.setAttribute("aria-hidden", "true");
  shown.textContent = quoted ? `«${visible(text)}»` : visible(text);
  const said = document.createElement("span");
  said.className = "sr-only";
  said.textContent = spoken(text);
  both.append(shown, said);
  return both;
}

// #status is a live region: a screen reader reads out each change, so it changes at the start and the end of a
// generation and on errors. The count of tokens, which changes with each one, goes to #progress, shown only.
function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
  $("progress").textContent = "";
}

// The server could not be reached, or the connection broke (fetch says only "Failed to fetch" or "network error").
class ConnectionLost extends Error {}
const NO_SERVER = "cannot reach the server: is fungpt serve still running? Start it again, then reload this page";

async function reach(promise) {
  try {
    return await promise;
  } catch (err) {
    if (err.name === "AbortError") throw err;  // Stop was pressed
    throw new ConnectionLost(NO_SERVER);
  }
}

async function fetchJSON(url, options) {
  const response = await reach(fetch(url, options));
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

// ------------------------------------------------------------------ run info, config, loss curve

// After a refusal: a server started again on another run refuses what the page built for the one it showed (a
// token id out of the new vocabulary, a layer the new model lacks). If another model answers now, show its details
// and curve, and return a note saying so for the error line ("" when the same model answers, or none).
async function anotherModelNote() {
  const info = await fetchJSON("/api/info").catch(() => null);
  if (!info || !state.info || info.model === state.info.model) return "";
  await loadInfo().catch(() => {});
  loadMetrics().catch(() => {});
  return ` (the server now serves ${info.run} at step ${info.step}, shown above: generate again)`;
}

async function loadInfo() {
  const info = await fetchJSON("/api/info");
  state.info = info;
  const params = info.params >= 1e6 ? `${(info.params / 1e6).toFixed(2)}M` : `${(info.params / 1e3).toFixed(1)}k`;
  $("run-summary").textContent =
    `${info.run} · step ${info.step} (${info.checkpoint}) · ${params} parameters · ` +
    `${info.n_layer} layer${info.n_layer === 1 ? "" : "s"} × ` +
    `${info.n_head} head${info.n_head === 1 ? "" : "s"} × ${info.n_embd} wide · context ${info.block_size} · ` +
    `${info.tokenizer} tokenizer, ${info.vocab_size} tokens · ${info.device}`;
  fillSelect($("layer"), info.n_layer);
  fillSelect($("head"), info.n_head);
  $("max_new_tokens").max = info.limits.max_new_tokens;
  $("max_new_tokens").min = Math.min(10, info.limits.max_new_tokens);  // (the arrows step by 10 from it)
  // (no maxLength on the prompt: the browser would cut a longer paste without a word; the server says so)
  for (const id of ["eot-control", "help-eot-term", "help-stop_at_eot"]) {
    $(id).hidden = !info.has_eot;  // (a char tokenizer has no end-of-text token)
  }
  renderConfig(info.config);
}

function fillSelect(select, n) {
  const kept = Number(select.value);  // the layer or head chosen before a newer checkpoint: kept if it still exists
  select.innerHTML = "";
  for (let i = 0; i < n; i++) select.add(new Option(String(i), String(i)));
  if (select.value !== "" && kept < n) select.value = String(kept);
}

function renderConfig(config) {
  const box = $("config");
  box.innerHTML = "";
  const row = (key, value) => {
    const div = document.createElement("div");
    div.className = "kv";
    const k = document.createElement("span");
    const v = document.createElement("span");
    k.textContent = key;
    v.textContent = value === null ? "—" : String(value);
    div.append(k, v);
    box.append(div);
  };
  const entries = Object.entries(config || {});
  for (const [key, value] of entries) if (typeof value !== "object" || value === null) row(key, value);
  for (const [key, value] of entries) {
    if (typeof value !== "object" || value === null) continue;
    const head = document.createElement("div");
    head.className = "sec";
    head.textContent = `[${key}]`;
    box.append(head);
    for (const [k, v] of Object.entries(value)) row(k, v);
  }
  if (!entries.length) box.textContent = "(this run has no config.json)";
}

// Round numbers for axis ticks: 1, 2 or 5 times a power of ten.
function ticks(lo, hi, count) {
  const raw = (hi - lo) / Math.max(count, 1);
  const mag = Math.pow(10, Math.floor(Math.log10(raw || 1)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9; t += step) out.push(+t.toFixed(10));
  return out;
}

async function loadMetrics() {
  const svg = $("loss");
  const { train, eval: evals, note, nonfinite } = await fetchJSON("/api/metrics");
  const W = 420, H = 240, left = 42, right = 22, top = 10, bottom = 30;  // (right: room for the last step's label)
  const points = train.map(([s, l]) => [s, l]).concat(evals.map(([s, , v]) => [s, v]));
  const ns = "http://www.w3.org/2000/svg";
  const el = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.append(e);
    return e;
  };
  svg.innerHTML = "";
  if (!points.length) {
    const why = note ? "the run folder now holds another model: restart fungpt serve"
      : nonfinite ? `all ${nonfinite} logged losses are NaN or infinite: the run diverged`
      : "no metrics.jsonl in this run";
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, why);
    svg.setAttribute("aria-label", `loss curve: ${why}`);
    return;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  // (reduce, not Math.min(...xs): spreading a long list overflows the call stack)
  const least = (v) => v.reduce((a, b) => Math.min(a, b)), most = (v) => v.reduce((a, b) => Math.max(a, b));
  const x0 = least(xs), x1 = Math.max(most(xs), x0 + 1);
  const y0 = least(ys), y1 = Math.max(most(ys), y0 + 1e-3);
  const X = (s) => left + ((s - x0) / (x1 - x0)) * (W - left - right);
  const Y = (l) => top + (1 - (l - y0) / (y1 - y0)) * (H - top - bottom);
  for (const t of ticks(y0, y1, 5)) {
    el("line", { class: "grid", x1: left, x2: W - right, y1: Y(t), y2: Y(t) });
    el("text", { x: left - 5, y: Y(t) + 4, "text-anchor": "end" }, String(t));
  }
  for (const t of ticks(x0, x1, 5).filter(Number.isInteger)) {  // (steps are whole: a short run's 0.2, 1.5 are not)
    el("text", { x: X(t), y: H - bottom + 15, "text-anchor": "middle" }, String(t));
  }
  el("line", { class: "axis", x1: left, x2: W - right, y1: H - bottom, y2: H - bottom });
  el("line", { class: "axis", x1: left, x2: left, y1: top, y2: H - bottom });
  el("text", { x: (left + W - right) / 2, y: H - 2, "text-anchor": "middle" }, "step");
  // A run that diverged logged NaN losses: the server leaves them out; say so rather than end the curve silently.
  if (nonfinite) el("text", { x: W - right, y: top + 12, "text-anchor": "end" }, `${nonfinite} NaN/inf losses not drawn`);
  // What the picture shows, for a screen reader: where each curve starts and ends
  const ends = (name, rows) => rows.length ? [`${name} ${rows[0][1].toFixed(3)} at step ${rows[0][0]}` +
    (rows.length > 1 ? ` to ${rows.at(-1)[1].toFixed(3)} at step ${rows.at(-1)[0]}` : "")] : [];
  const described = ends("train loss", train).concat(ends("val loss", evals.map(([s, , v]) => [s, v])));
  svg.setAttribute("aria-label", `loss curve: ${described.join("; ")}`);
  const path = (rows) => rows.map(([s, l], i) => `${i ? "L" : "M"}${X(s).toFixed(1)},${Y(l).toFixed(1)}`).join("");
  if (train.length) el("path", { class: "train", d: path(train) });
  const val = evals.map(([s, , v]) => [s, v]);
  if (val.length) el("path", { class: "val", d: path(val) });
  for (const [s, v] of val) {
    el("circle", { class: "valdot", cx: X(s), cy: Y(v), r: 2.5 }).append(
      Object.assign(document.createElementNS(ns, "title"), { textContent: `step ${s}: val ${v.toFixed(3)}` }));
  }
}

// ------------------------------------------------------------------ generation (streamed)

// What an empty box means, and its name in messages.
const NUMBER_BOXES = {
  temperature: ["temperature", "0.8"], top_k: ["top-k", "off"], top_p: ["top-p", "off"],
  max_new_tokens: ["max new tokens", "the server's default"], seed: ["seed", "1337"],
};

function readSettings() {
  // A box holding what the browser cannot read as a number ("5e", "-") has the value "", as an empty one does:
  // say so, rather than generate with the default the user did not choose.
  for (const [id, [name, empty]] of Object.entries(NUMBER_BOXES)) {
    if ($(id).validity.badInput) throw new Error(`${name} is not a number: correct it, or empty the box (empty: ${empty})`);
  }
  const num = (id) => $(id).value.trim() === "" ? null : Number($(id).value);
  return {
    prompt: $("prompt").value,
    temperature: num("temperature") ?? 0.8,
    top_k: num("top_k"),
    top_p: num("top_p"),
    max_new_tokens: num("max_new_tokens"),  // an emptied box: the server's default (200, or its limit if lower)
    seed: num("seed") ?? 1337,  // an emptied box: the page's and the server's default seed
    stop_at_eot: $("stop_at_eot").checked,
    stop: unescape($("stop_text").value),  // "" (the server's default): none
  };
}

// The stop box's escapes, as fungpt sample --stop reads them: \n a newline, \r a carriage return, \t a tab,
// \\ one backslash (a one-line box cannot hold a newline)
function unescape(text) {
  return text.replace(/\\([nrt\\])/g, (_, c) => ({ n: "\n", r: "\r", t: "\t", "\\": "\\" })[c]);
}

// JavaScript numbers are doubles: above 2^53 a seed would silently become a neighbouring one
// (9007199254740993 is sent as ...992), and give another seed's text than `fungpt sample --seed`.
function checkSeed(seed) {
  if (!Number.isSafeInteger(seed) || seed < 0) {
    throw new Error(`seed must be a whole number from 0 to ${Number.MAX_SAFE_INTEGER} here ` +
                    "(fungpt sample --seed takes larger ones)");
  }
}

function addTokenSpan(token, kind, index) {
  const span = document.createElement("span");
  span.className = `tok ${kind}`;
  // A newline token gets a visible arrow, so it can be seen and clicked, then the line break.
  // Generated tokens show their piece: the text they complete. A token holding only the first byte(s)
  // of a character completes nothing yet; it stays a small clickable box (see TextStream in tokenizer.py).
  const text = kind === "gen" ? (token.piece ?? token.text) : token.text;
  span.textContent = kind === "gen" ? text.replace(/\n/g, "↵\n") : text;
  if (kind === "gen" && text === "") span.classList.add("partial");
  if (kind === "gen") {
    span.dataset.index = index;
    const percent = `${(100 * token.prob).toFixed(1)}%`;
    span.title = `token ${token.id}, p = ${percent}`;
    // The keyboard: the sample is one stop of Tab (its selected token, else its first), Enter or Space selects
    // the token, as a click does, and the arrow keys (Home, End) move along the tokens and select them.
    // A screen reader hears each token as an option of the listbox, by its text and probability.
    span.tabIndex = index === 0 ? 0 : -1;
    span.setAttribute("role", "option");
    span.setAttribute("aria-selected", "false");
    span.setAttribute("aria-label", `${spoken(text)}, ${percent}`);
    span.addEventListener("click", () => selectToken(index));
    span.addEventListener("keydown", (e) => {
      const to = { ArrowRight: index + 1, ArrowDown: index + 1, ArrowLeft: index - 1, ArrowUp: index - 1,
                   Home: 0, End: state.gen.length - 1 }[e.key];
      if (e.key === "Enter" || e.key === " ") selectToken(index);
      else if (to !== undefined && to >= 0 && to < state.gen.length) selectToken(to, true);
      else return;
      e.preventDefault();
    });
  }
  (kind === "gen" ? tokenList() : $("output")).append(span);
  return span;
}

// The generated tokens' listbox, after the prompt in #output (made at the first token)
function tokenList() {
  let list = $("gen-tokens");
  if (!list) {
    list = document.createElement("span");
    list.id = "gen-tokens";
    list.setAttribute("role", "listbox");
    list.setAttribute("aria-orientation", "horizontal");
    list.setAttribute("aria-label", "generated tokens: the arrow keys step through them");
    $("output").append(list);
  }
  return list;
}

// The sample as one plain text, for a screen reader (the tokens are options, read one at a time): set when the
// generation ends, however it ends.
function describeSample(tail = "") {
  const text = state.gen.map((t) => t.piece ?? t.text).join("") + tail;
  $("sample-text").textContent = state.gen.length ? `Sample: ${state.prompt}${text}` : "";
}

async function generate() {
  if (state.controller) return;
  let settings;
  try {
    settings = readSettings();
    checkSeed(settings.seed);
  } catch (err) {
    setStatus(err.message, true);
    return;
  }
  // The sample on screen stays until the server accepts the request (settings it refuses leave it there)
  let cleared = false;
  const clear = () => {
    state.gen = [];
    state.promptTokens = [];
    state.selected = null;
    $("output").innerHTML = "";
    $("sample-text").textContent = "";
    $("output").dataset.state = "running";
    clearInspector();
    cleared = true;
  };
  const before = $("output").dataset.state;  // (given back if the request is refused: its sample stays)
  $("output").dataset.state = "waiting";  // (not the old sample's "done": a new one is on its way)
  const controller = new AbortController();
  state.controller = controller;
  const fromButton = document.activeElement === $("generate");
  $("generate").disabled = true;
  $("stop").disabled = false;
  if (fromButton) $("stop").focus();  // (a disabled button loses the focus: keyboard users keep a place)
  setStatus("generating…");
  const started = performance.now();
  try {
    const response = await reach(fetch("/api/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(settings),
      signal: controller.signal,
    }));
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error || `${response.status} ${response.statusText}`);
    }
    clear();
    // Server-sent events: blocks separated by a blank line, each "data: {json}".
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reach(reader.read());
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (line.startsWith("data: ")) handleEvent(JSON.parse(line.slice(6)), started, settings.prompt);
        }
      }
    }
    if ($("output").dataset.state === "running") {  // (no "done" nor "error" event: cut short on the way)
      $("output").dataset.state = "done";
      setStatus(`the stream ended after ${state.gen.length} tokens without the server's last word: the sample may ` +
                "be cut short", true);
    }
  } catch (err) {
    if (!cleared) {  // (refused, not reached, or stopped before the answer: the sample on screen is kept)
      if (before === undefined) delete $("output").dataset.state;
      else $("output").dataset.state = before;
      const stopped = err.name === "AbortError";
      setStatus(stopped ? "stopped before the server answered" : err.message, !stopped);
      if (!stopped && !(err instanceof ConnectionLost)) {
        const note = await anotherModelNote();
        if (note) setStatus(err.message + note, true);
      }
      return;
    }
    if (err.name === "AbortError") {
      setStatus(`stopped after ${state.gen.length} tokens`);
      $("output").dataset.state = "done";
    } else if (err instanceof ConnectionLost && state.gen.length) {
      setStatus(`lost the connection to the server after ${state.gen.length} tokens (the sample ends there): ` +
                "is fungpt serve still running?", true);
      $("output").dataset.state = "error";
    } else {
      $("output").dataset.state = "error";
      setStatus(err.message, true);
      if (!(err instanceof ConnectionLost)) {
        const note = await anotherModelNote();  // (no new generation starts meanwhile: state.controller is set)
        if (note) setStatus(err.message + note, true);
      }
    }
  } finally {
    state.controller = null;
    if (!$("sample-text").textContent) describeSample();  // (stopped, or cut short: the tokens that came)
    const stopFocused = document.activeElement === $("stop");
    $("generate").disabled = false;
    $("stop").disabled = true;
    if (stopFocused || document.activeElement === document.body) $("generate").focus();
  }
}

function handleEvent(event, started, prompt) {
  if (event.type === "start") {
    // Another model answers than the page shows: a run still training (the server loaded a newer checkpoint),
    // or a server started again, perhaps on another run. Show the one that answers, and its curve.
    if (state.info && event.model !== state.info.model) {
      loadInfo().catch(() => {});
      loadMetrics().catch(() => {});
    }
    state.sampleStep = event.step;  // the checkpoint this sample comes from (attention may come from a newer one)
    state.sampleModel = event.model;
    state.prompt = prompt;  // the prompt sent (the box may have been edited since)
    state.promptTokens = event.prompt_tokens;
    addTokenSpan({ text: state.prompt }, "prompt");
    $("output").scrollTop = $("output").scrollHeight;  // (a prompt taller than the box: its end, where tokens come)
  } else if (event.type === "token") {
    state.gen.push(event);
    const span = addTokenSpan(event, "gen", state.gen.length - 1);
    $("progress").textContent = `${state.gen.length} tokens`;
    // Follow the text as it grows, unless the reader scrolled up to look at an earlier part
    const out = $("output");
    if (out.scrollHeight - out.scrollTop - out.clientHeight < 40 + span.offsetHeight) out.scrollTop = out.scrollHeight;
  } else if (event.type === "done") {
    // Bytes at the end that never completed a character: shown as the server's text has them (U+FFFD)
    if (event.tail) $("output").append(document.createTextNode(event.tail));
    describeSample(event.tail || "");
    const seconds = (performance.now() - started) / 1000;
    const ended = event.stopped_at_eot ? " (the model ended the document: it drew <|endoftext|>)"
      : event.stopped_at_stop ? " (the text reached the stop text)" : "";
    setStatus(`done: ${event.n_tokens} tokens in ${seconds.toFixed(1)} s${ended} — click a token`);
    $("output").dataset.state = "done";
  } else if (event.type === "error") {
    setStatus(event.error, true);
    $("output").dataset.state = "error";
  }
}

// ------------------------------------------------------------------ inspecting one step

function clearInspector() {
  $("step-info").textContent = "Click a generated token.";
  $("probs").innerHTML = "";
  $("attn-info").textContent = "Click a generated token to see what the model looked at when it predicted it.";
  const canvas = $("heatmap");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  canvas.setAttribute("aria-label", "attention map: click a generated token first");
  delete canvas.dataset.t;
  state.attn = null;
  state.attnIndex = null;
  state.cursor = null;
  $("attn-hover").textContent = "\u00a0";
}

function selectToken(index, focus = false) {
  state.selected = index;
  const token = state.gen[index];
  $("step-info").innerHTML = "";
  const strong = document.createElement("strong");
  strong.className = "mono";
  strong.append(tokenText(token.text));
  $("step-info").append(`Step ${index + 1}: the model picked `, strong,
    ` (p = ${(100 * token.prob).toFixed(1)}%). Its top 10 candidates were:`);
  drawProbs(token);
  for (const el of document.querySelectorAll(".tok.selected")) {
    el.classList.remove("selected");
    el.setAttribute("aria-selected", "false");
    el.removeAttribute("aria-describedby");
  }
  for (const el of document.querySelectorAll(".tok.gen[tabindex='0']")) el.tabIndex = -1;
  const span = document.querySelector(`.tok.gen[data-index="${index}"]`);
  if (span) {
    span.classList.add("selected");
    span.setAttribute("aria-selected", "true");
    // (read out with the token when it gets the focus: what the step's panel now says, written above)
    span.setAttribute("aria-describedby", "step-info probs");
    span.tabIndex = 0;  // Tab comes back to the selected token
    if (focus) span.focus();
  }
  loadAttention();
}

function drawProbs(token) {
  const box = $("probs");
  box.innerHTML = "";
  const max = Math.max(...token.top.map((c) => c.prob), 1e-9);
  for (const cand of token.top) {
    const row = document.createElement("div");
    row.className = "bar-row" + (cand.id === token.id ? " chosen" : "");
    row.innerHTML = `<span class="cand"></span><div class="track"><div class="bar"></div></div><span class="pct"></span>`;
    row.querySelector(".cand").append(tokenText(cand.text, false));
    row.querySelector(".cand").title = `«${visible(cand.text)}», token ${cand.id}`;  // (a long one is cut short)
    row.querySelector(".bar").style.width = `${(100 * cand.prob) / max}%`;
    row.querySelector(".pct").textContent = `${(100 * cand.prob).toFixed(1)}%`;
    box.append(row);
  }
  if (!token.top.some((c) => c.id === token.id)) {
    const note = document.createElement("div");
    note.className = "small muted";
    note.textContent = `The picked token was not in the top 10 (sampling is random).`;
    box.append(note);
  }
}

async function loadAttention() {
  if (state.selected === null) return;
  const index = state.selected;
  // The context the model read to predict this token: the prompt plus everything generated before it.
  const ids = state.promptTokens.map((t) => t.id).concat(state.gen.slice(0, index).map((t) => t.id));
  const layer = Number($("layer").value), head = Number($("head").value);
  const request = ++state.attnRequest;
  try {
    const result = await fetchJSON("/api/attention", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ids, layer, head }),
    });
    // Answers can arrive out of order: show only the latest request's (another token, layer or head may
    // have been picked meanwhile).
    if (request !== state.attnRequest || state.selected !== index) return;
    // The keyboard's cell stays where it was for another layer or head of the same token's map, else starts again
    const T0 = result.weights.length;
    const same = state.attn && state.attnIndex === index && state.cursor && state.cursor.i < T0;
    state.attn = result;
    state.attnIndex = index;
    state.cursor = same ? state.cursor : null;
    $("attn-hover").textContent = "\u00a0";
    drawHeatmap(result);
    if (state.cursor) describeCell(state.cursor.i, state.cursor.j, true);
    const T = result.tokens.length;
    // Two different reasons for a map that starts after the first token: the model reads only its last
    // block_size tokens (the ones before get no attention at all), and the server sends at most the last
    // MAX_ATTENTION_TOKENS of those (the weight on the others is real, only not drawn).
    const start = result.window_start ?? 0;
    const notes = [];
    if (start > 0) notes.push(`the model reads only its last ${ids.length - start} tokens; the ${start} before ` +
      "them get no attention");
    if (result.offset > start) notes.push(`only the last ${T} of the tokens it reads are drawn; the weight on ` +
      "the earlier ones is not");
    // A run still training: the server may have loaded a newer checkpoint since this sample was generated; or it
    // was started again, perhaps on another run (then the page shows that one's details).
    if (result.model !== state.sampleModel) {
      notes.push(result.step !== state.sampleStep
        ? `these weights are from step ${result.step}, the sample from step ${state.sampleStep}: generate again ` +
          "to see both from one checkpoint"
        : "these weights are not those that generated the sample (the server has loaded others since): " +
          "generate again to see both from one model");
      if (state.info && result.model !== state.info.model) {
        loadInfo().catch(() => {});
        loadMetrics().catch(() => {});
      }
    }
    const cropped = notes.length ? ` (${notes.join("; ")})` : "";
    $("attn-info").textContent =
      `Layer ${layer}, head ${head}: row i shows how much token i attends to each earlier token j${cropped}. ` +
      `The bottom row is what the model looked at when it predicted «${visible(state.gen[index].text)}».`;
    // The picture in words: the bottom row's largest weights
    const last = result.weights[T - 1].map((w, j) => [w, j]).sort((a, b) => b[0] - a[0]).slice(0, 5);
    $("heatmap").setAttribute("aria-label", `attention map of layer ${layer}, head ${head}, ${T} tokens; when ` +
      `predicting «${spoken(state.gen[index].text)}» it attended most to ` +
      last.map(([w, j]) => `${(result.offset ?? 0) + j} «${spoken(result.tokens[j].text)}» ${w.toFixed(2)}`)
        .join(", ") +
      ". Focus the map and use the arrow keys to read any weight.");
  } catch (err) {
    // (as an answer: an old request's error, for a token no longer picked or a sample since replaced, is dropped)
    if (request !== state.attnRequest || state.selected !== index) return;
    $("attn-info").textContent = `attention: ${err.message}`;
    const note = err instanceof ConnectionLost ? "" : await anotherModelNote();
    if (note && request === state.attnRequest && state.selected === index) {
      $("attn-info").textContent = `attention: ${err.message}${note}`;
    }
  }
}

// White (0) to deep blue (1). A square-root scale makes small but real weights visible.
function color(w) {
  const t = Math.sqrt(Math.max(0, Math.min(1, w)));
  const r = Math.round(255 - t * (255 - 24)), g = Math.round(255 - t * (255 - 64)), b = Math.round(255 - t * (255 - 160));
  return `rgb(${r},${g},${b})`;
}

// The masked cells (the future: a token never sees the tokens after it) are hatched, unlike any weight's colour
function hatch(ctx) {
  const tile = document.createElement("canvas");
  tile.width = tile.height = 6;
  const t = tile.getContext("2d");
  t.fillStyle = "#fff";
  t.fillRect(0, 0, 6, 6);
  t.strokeStyle = "#9aa2ac";
  t.beginPath();
  t.moveTo(0, 6); t.lineTo(6, 0);
  t.stroke();
  return ctx.createPattern(tile, "repeat");
}

function drawHeatmap(result) {
  const canvas = $("heatmap");
  const ctx = canvas.getContext("2d");
  const T = result.weights.length;
  const cell = canvas.width / T;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const masked = hatch(ctx);
  for (let i = 0; i < T; i++) {
    for (let j = 0; j < T; j++) {
      ctx.fillStyle = j > i ? masked : color(result.weights[i][j]);
      ctx.fillRect(j * cell, i * cell, Math.ceil(cell), Math.ceil(cell));
    }
  }
  if (state.cursor) {  // the keyboard's cell: a dark frame
    ctx.strokeStyle = "#1f2328";
    ctx.lineWidth = 2;
    ctx.strokeRect(state.cursor.j * cell + 1, state.cursor.i * cell + 1, Math.max(cell - 2, 2), Math.max(cell - 2, 2));
  }
  canvas.dataset.t = String(T);
}

// The weight of one cell, in words: shown in #attn-hover (under the mouse, or the keyboard's cursor), and for the
// keyboard's (`say`) also read out by a screen reader (#attn-said: whitespace and punctuation in words)
function describeCell(i, j, say = false) {
  const result = state.attn;
  const o = result.offset ?? 0;  // (tokens are numbered from the text's first: a map cut for drawing starts later)
  const line = (name) => {
    const q = name(result.tokens[i].text), k = name(result.tokens[j].text);
    return j > i ? `query ${o + i} «${q}» cannot see the later key ${o + j} «${k}»`
      : `query ${o + i} «${q}» → key ${o + j} «${k}»: ${result.weights[i][j].toFixed(3)}`;
  };
  $("attn-hover").textContent = line(visible);
  if (say) $("attn-said").textContent = line(spoken).replace("→", "to");
}

function onHeatmapHover(event) {
  const result = state.attn;
  if (!result) return;
  const canvas = $("heatmap");
  const rect = canvas.getBoundingClientRect();
  const T = result.weights.length;
  const j = Math.floor(((event.clientX - rect.left) / rect.width) * T);
  const i = Math.floor(((event.clientY - rect.top) / rect.height) * T);
  if (i < 0 || j < 0 || i >= T || j >= T) return;
  describeCell(i, j);
}

// The keyboard on the heat map: the arrows move a cursor cell by cell, Home and End to a row's ends. It starts on
// the bottom row (the token picked), at its largest weight.
function onHeatmapKey(event) {
  const result = state.attn;
  if (!result) return;
  const T = result.weights.length;
  const start = () => {
    const row = result.weights[T - 1];
    return { i: T - 1, j: row.indexOf(Math.max(...row)) };
  };
  const c = state.cursor || start();
  const moves = { ArrowUp: [c.i - 1, c.j], ArrowDown: [c.i + 1, c.j], ArrowLeft: [c.i, c.j - 1],
                  ArrowRight: [c.i, c.j + 1], Home: [c.i, 0], End: [c.i, c.i] };
  if (!(event.key in moves)) return;
  event.preventDefault();
  const [i, j] = state.cursor ? moves[event.key] : [c.i, c.j];  // (the first key shows where the cursor starts)
  state.cursor = { i: Math.max(0, Math.min(T - 1, i)), j: Math.max(0, Math.min(T - 1, j)) };
  drawHeatmap(result);
  describeCell(state.cursor.i, state.cursor.j, true);
}

// ------------------------------------------------------------------ wiring

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); // Ctrl+Enter generates
});
// Enter in a setting's box generates, as in a form; Escape anywhere stops a generation
for (const box of document.querySelectorAll("#controls input")) {
  box.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); generate(); }
  });
}
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && state.controller) state.controller.abort();
});
$("layer").addEventListener("change", loadAttention);
$("head").addEventListener("change", loadAttention);
$("heatmap").addEventListener("mousemove", onHeatmapHover);
$("heatmap").addEventListener("keydown", onHeatmapKey);
// Each setting's help (in the "What the settings do" list) is also its label's tooltip
for (const box of document.querySelectorAll("#controls [aria-describedby]")) {
  box.closest("label").title = $(box.getAttribute("aria-describedby")).textContent.replace(/\s+/g, " ").trim();
}
// The heat map's key: the colours of weights 0 to 1 (stops where the square-root scale bends)
$("attn-ramp").style.background =
  `linear-gradient(to right, ${[0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1].map((w) => `${color(w)} ${100 * w}%`).join(", ")})`;

loadInfo().catch((err) => setStatus(`could not load the run: ${err.message}`, true));
loadMetrics().catch((err) => {
  setStatus(`could not load the loss curve: ${err.message}`, true);
  $("loss").setAttribute("aria-label", "loss curve: could not be loaded");
});

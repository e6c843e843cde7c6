"""The benchmark scripts' ways of putting two contenders side by side (bench/), on stand-ins: no timing asserted."""

import os
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture()
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import benchlib from their own folder


def test_alternating_takes_turns_every_k_tokens_and_compares_the_tokens(bench):
    from bench_generate import alternating

    n, k, order = 10, 4, []

    def fake_hf(streamer):  # like generate: the prompt first, then every new token, then end()
        streamer.put(torch.tensor([[7, 7]]))
        for i in range(n):
            order.append(("hf", i))
            streamer.put(torch.tensor([i]))
        streamer.end()
        return torch.arange(n)

    def stream(tokens):
        for i in tokens:
            order.append(("fungpt", i))
            yield torch.tensor([i])

    hf_s, fungpt_s, same = alternating(fake_hf, stream(range(n)), n, k)
    assert same
    runs = list(_runs(order))
    assert [run[0][0] for run in runs] == ["hf", "fungpt"] * 3
    assert [len(run) for run in runs] == [4, 4, 4, 4, 2, 2]  # k tokens a turn, then what is left
    assert not alternating(fake_hf, stream([0] * n), n, k)[2]  # different tokens are reported


def test_alternating_splits_the_time_between_the_two(bench, monkeypatch):
    import bench_generate

    clock = [0.0]
    monkeypatch.setattr(bench_generate, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    n = 10

    def fake_hf(streamer):  # 1 s per HF token
        streamer.put(torch.tensor([[0]]))
        for i in range(n):
            clock[0] += 1.0
            streamer.put(torch.tensor([i]))
        streamer.end()
        return torch.arange(n)

    def stream():  # 0.25 s per FunGPT token
        for i in range(n):
            clock[0] += 0.25
            yield torch.tensor([i])

    assert bench_generate.alternating(fake_hf, stream(), n, 3) == (10.0, 2.5, True)


def _runs(order, side=lambda event: event[0]):
    """The runs of consecutive events by the same side."""
    group = [order[0]]
    for event in order[1:]:
        if side(event) != side(group[-1]):
            yield group
            group = []
        group.append(event)
    yield group


def _stamper(path: Path, seconds: float) -> list[str]:
    """A command that writes its clock every millisecond for `seconds` of its own running, then prints done."""
    code = textwrap.dedent(f"""
        import time
        with open({str(path)!r}, "w") as f:
            ran, last = 0.0, time.monotonic()
            while ran < {seconds}:
                now = time.monotonic()
                ran += min(now - last, 0.005)  # a pause (SIGSTOP) does not count as running
                last = now
                f.write(f"{{now}}\\n")
                f.flush()
                time.sleep(0.001)
        print("done")
    """)
    return [sys.executable, "-c", code]


def test_run_taking_turns_never_runs_the_commands_together_and_stops_them_with_the_lead(bench, tmp_path):
    from bench_train import run_taking_turns

    paths = [tmp_path / "a.txt", tmp_path / "lead.txt"]
    results = run_taking_turns([_stamper(paths[0], 3.0), _stamper(paths[1], 0.5)], dict(os.environ), 0.1, lead=1)
    assert results[1][0].strip() == "done" and "done" not in results[0][0]  # the other was stopped mid-way
    stamps = [[float(t) for t in p.read_text().split()] for p in paths]
    # ... when the lead ended (the lead may still take one more turn to exit after its last stamp): without the
    # lead's end stopping it, it would have run on alone for another ~2.5 s
    assert max(stamps[0]) < max(stamps[1]) + 2 * 0.1
    events = [i for _, i in sorted((t, i) for i, ts in enumerate(stamps) for t in ts)]
    runs = _runs(events, side=lambda i: i)  # clock stamps in a row from the same command
    # Turns of 0.1 s over 0.5 s of the lead's running: about 10 runs of ~100 stamps (1 per ms). Running at the
    # same time, their stamps would interleave in hundreds of short runs.
    assert 4 <= len(list(runs)) <= 40


def test_run_taking_turns_reports_a_failed_command_and_leaves_nothing_running(bench, tmp_path):
    from bench_train import run_taking_turns

    pid_file = tmp_path / "pid"
    # The sleeper writes its pid whole (a rename), and the failing command fails only once that file is there,
    # however slow the machine is.
    sleeper = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r} + '.tmp', 'w').write(str(os.getpid())); "
               f"os.rename({str(pid_file)!r} + '.tmp', {str(pid_file)!r}); time.sleep(30)"]
    failing = [sys.executable, "-c", f"import os, time\nwhile not os.path.exists({str(pid_file)!r}): time.sleep(0.01)\n"
               "print('bo' + 'om'); raise SystemExit(3)"]  # 'boom' only in its output
    with pytest.raises(SystemExit, match="boom"):
        run_taking_turns([sleeper, failing], dict(os.environ), 0.3, lead=0)
    assert _ended(int(pid_file.read_text()))  # killed, not left paused or running


def _ended(pid: int, wait_s: float = 5.0) -> bool:
    """Whether process pid has ended: gone, or a zombie (a command's launcher died with it, so the command waits
    for init to collect it). Waits up to wait_s for a SIGKILL to be delivered."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X") or time.monotonic() > deadline:
            return state in ("Z", "X")
        time.sleep(0.01)


def test_alternating_with_a_real_hf_generate_gives_every_token_to_both(bench, tmp_path):
    """Pins the streamer protocol of the installed transformers: the prompt first, then one call per new token."""
    transformers = pytest.importorskip("transformers")
    from bench_generate import alternating

    from fungpt.model import GPT

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=17, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    model = GPT.from_hf(tmp_path).eval()
    prompt, n = torch.tensor([[1, 2, 3]]), 7

    def hf_generate(streamer):
        with torch.no_grad():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=0, streamer=streamer)
        return out[0, prompt.size(1):]

    stream = model.generate_stream(prompt, n, temperature=0.0)
    hf_s, fungpt_s, same = alternating(hf_generate, stream, n, 3)
    assert same and next(stream, None) is None  # FunGPT made exactly n tokens, the same as HF's


def _rss_mib() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("bias, tied", [(False, True), (True, False), (True, True)])
def test_bench_generate_measures_the_configs_own_model_on_the_same_weights_as_hf(bench, tmp_path, bias, tied):
    """A config without biases (configs/shakespeare-char.toml) or with an untied head was measured as GPT-2's layout:
    FunGPT's tokens/s were another model's than the config's."""
    pytest.importorskip("transformers")
    from bench_generate import build_models

    from fungpt.model import GPTConfig

    cfg = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=bias, tie_embeddings=tied)
    hf, model, why = build_models(cfg, 0.02, tmp_path)
    assert why == "" and (model.config.bias, model.config.tie_embeddings) == (bias, tied)
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), rtol=1e-4, atol=1e-5)


def test_peak_rss_is_the_commands_own_not_the_bench_scripts(bench):
    """wait4 on a command started straight from a large process reports at least that process's size."""
    from bench_train import run_measured

    ballast = torch.ones(256 * 2**20 // 4)  # this process: 256 MiB larger than the command will be
    command = [sys.executable, "-S", "-c", "x = b'x' * (64 << 20); print(len(x))"]  # writes 64 MiB
    out, _, peak = run_measured(command, dict(os.environ))
    assert out.strip() == str(64 << 20)
    assert 64 <= peak < 64 + 64 < _rss_mib()  # its 64 MiB plus an interpreter, far below this process
    del ballast


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_run_taking_turns_reports_each_commands_peak_also_when_it_is_stopped(bench, tmp_path):
    from bench_train import run_taking_turns

    ballast = torch.ones(256 * 2**20 // 4)
    # The lead ends only once the holder has written all its 96 MiB (it waits for the holder's flag file), so
    # the holder's peak is complete however slow the machine is; the holder is then killed mid-sleep.
    flag = tmp_path / "written"
    holder = [sys.executable, "-S", "-c",
              f"import time; x = b'x' * (96 << 20); open({str(flag)!r}, 'w').close(); time.sleep(30)"]
    lead = [sys.executable, "-S", "-c",
            f"import os, time\nwhile not os.path.exists({str(flag)!r}): time.sleep(0.01)\nx = b'x' * (32 << 20)"]
    (_, held), (_, led) = run_taking_turns([holder, lead], dict(os.environ), 0.2, lead=1)
    assert 96 <= held < 96 + 64 and 32 <= led < 32 + 64 and held + led < _rss_mib()
    del ballast


def test_run_measured_stopped_early_leaves_nothing_running(bench, tmp_path, monkeypatch):
    """Ctrl-C while a command runs: the command goes too, not only its launcher (peak_rss.py)."""
    import subprocess
    import time

    from bench_train import run_measured

    pid_file = tmp_path / "pid"
    command = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
               "time.sleep(30)"]

    def interrupted(self, *args, **kwargs):  # Ctrl-C once the command is running
        deadline = time.monotonic() + 20
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.01)
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess.Popen, "communicate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_measured(command, dict(os.environ))
    assert _ended(int(pid_file.read_text()))


def test_profile_step_lists_where_a_training_step_goes():
    """bench/profile_step.py on a tiny shape: the step's operations, the Linear products among them."""
    import subprocess

    proc = subprocess.run([sys.executable, str(BENCH / "profile_step.py"), "--shape", "1,2,16,8", "--batch-size", "2",
                           "--steps", "2", "--cpu-matmul", "torch"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(BENCH.parent)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shape 1 x 16 (2 heads), block 8, batch 2: median step" in proc.stdout
    rows = proc.stdout.split("ms/step calls/step  share\n")[1].splitlines()
    assert len(rows) == 15 and any(r.startswith(("aten::addmm", "aten::mm", "aten::linear")) for r in rows), rows


def test_the_machine_line_names_the_cpu_generation(monkeypatch):
    """Two hosts both named "AMD EPYC" (Zen 4 and Zen 5) gave different ratios: each result says which it was."""
    monkeypatch.syspath_prepend(str(BENCH))
    import benchlib

    fields = {"model name": "AMD EPYC", "cpu family": "25", "model": "17"}
    monkeypatch.setattr("fungpt.hardware.cpu_info", lambda field: fields.get(field, ""))
    assert benchlib.cpu_model() == "AMD EPYC (family 25, model 17)"
    fields.pop("cpu family")  # (not Linux, or not x86: the name alone)
    assert benchlib.cpu_model() == "AMD EPYC"


def test_bench_train_refuses_to_compare_other_shapes_or_batches(bench, tmp_path):
    """Flags after -- (or a --config) changed FunGPT's shape or batch while nanoGPT ran its own recipe: the block
    said one shape for both and printed a 36x "speed-up"."""
    import json

    import bench_train

    config = tmp_path / "config.json"
    base = {"model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "vocab_size": 65, "dropout": 0.0,
                      "pos_encoding": "learned", "norm": "layernorm", "tie_embeddings": True, "qk_norm": False,
                      "bias": False, "activation": "gelu"},
            "train": {"batch_size": 12, "grad_accum_steps": 1, "dtype": "auto", "compile": False,
                      "optimizer": "adamw"}}
    config.write_text(json.dumps(base))
    (tmp_path / "run.json").write_text(json.dumps({"dtype": "float32"}))  # (auto, as it ran on the CPU)
    bench_train.check_same_shape(tmp_path, None)  # the recipe itself: fine
    # another shape or batch; or (flags after -- again) another computation: the ratio printed a "speed-up" of
    # FunGPT in bfloat16, or with Muon, against nanoGPT in float32 with AdamW
    for part, key, value in (("model", "n_layer", 1), ("train", "batch_size", 16), ("train", "grad_accum_steps", 2),
                             ("model", "vocab_size", 2048), ("model", "dropout", 0.1),  # (a BPE config's)
                             ("train", "compile", True), ("train", "optimizer", "muon"),
                             ("model", "pos_encoding", "rope"), ("model", "qk_norm", True), ("model", "bias", True)):
        changed = json.loads(json.dumps(base))
        changed[part][key] = value
        config.write_text(json.dumps(changed))
        with pytest.raises(SystemExit, match=f"another model, batch or computation than nanoGPT's recipe \\({key} "
                                             f"{value} \\(nanoGPT: "):
            bench_train.check_same_shape(tmp_path, None)
    config.write_text(json.dumps(base))
    (tmp_path / "run.json").write_text(json.dumps({"dtype": "bfloat16"}))
    with pytest.raises(SystemExit, match=r"\(dtype bfloat16 \(nanoGPT: float32\)"):
        bench_train.check_same_shape(tmp_path, None)
    bench_train.check_same_shape(tmp_path, None, bf16=True)  # --bf16's run, on purpose (reported as such)
    (tmp_path / "run.json").write_text(json.dumps({"dtype": "float32"}))
    with pytest.raises(SystemExit, match=r"\(dtype float32 \(--bf16: bfloat16\)"):
        bench_train.check_same_shape(tmp_path, None, bf16=True)  # --bf16's run did not run bfloat16: said
    kept = json.loads(json.dumps(base))
    kept["model"].update(bias=True, activation="gelu_tanh")
    config.write_text(json.dumps(kept))
    bench_train.check_same_shape(tmp_path, None, keep_arch=True)  # --keep-arch: the config's layers, on purpose
    shaped = json.loads(json.dumps(base))
    shaped["model"].update(n_layer=6, n_head=6, n_embd=384, block_size=256)
    config.write_text(json.dumps(shaped))
    bench_train.check_same_shape(tmp_path, "6,6,384,256")  # --shape sets both sides


def test_bench_train_times_a_fungpt_step_by_its_whole_loop_as_nanogpt_does(bench):
    """dt_ms leaves out the row's writing, the bar and the loop's checks, which nanoGPT's dt counts: the step is
    timed between consecutive rows, and a step after an eval (whose row comes between) is left out."""
    import bench_train

    rows = [{"step": s, "dt_ms": 10.0, "elapsed_s": 0.012 * s} for s in range(18, 24)]
    rows.insert(4, {"step": 21, "train_loss": 3.0, "val_loss": 3.1, "elapsed_s": 0.5})  # the eval after step 21
    rows[5:] = [{**r, "elapsed_s": r["elapsed_s"] + 0.3} for r in rows[5:]]
    # steps 21 and 23: from the 21st on, as nanoGPT's iter >= 20 (its iters count from 0); 22 follows the eval
    assert [round(ms, 6) for ms in bench_train.loop_periods_ms(rows)] == [12.0, 12.0]


def test_bench_commands_are_recorded_ready_to_run_again(bench, tmp_path):
    """A path with a space was recorded unquoted: the printed command could not be pasted back."""
    import shlex

    from benchlib import check_append, command

    recorded = command("bench_train.py", ["--config", "/tmp/my cfg/baby.toml", "--rounds", "2"])
    assert shlex.split(recorded) == ["python", "bench/bench_train.py", "--config", "/tmp/my cfg/baby.toml",
                                     "--rounds", "2"]

    class Parser:
        def error(self, message):
            raise SystemExit(message)

    check_append(Parser(), tmp_path / "ok.md")  # can be written: nothing said
    with pytest.raises(SystemExit, match="--append .*missing/x.md: No such file or directory"):
        check_append(Parser(), tmp_path / "missing" / "x.md")  # before measuring, not after


@pytest.mark.skipif(sys.platform == "win32", reason="a file size limit (RLIMIT_FSIZE) stands for a full disk")
def test_an_append_that_fails_partway_leaves_the_file_as_it_was(bench, tmp_path):
    """--append on a full disk left half a result block in BENCHMARKS.md, and a raw traceback."""
    import subprocess

    path = tmp_path / "B.md"
    path.write_text("# Benchmarks\n\nolder results\n", encoding="utf-8")
    before = path.read_bytes()
    # the file may grow to 1 kB (then writes fail with EFBIG, as on a full disk): a block of 3 kB (it fitted in a
    # write buffer, whose flush failed again when the file was cut back: half a block stayed) and of 100 kB
    for block in (3000, 100_000):
        script = ("import resource, signal, sys; from pathlib import Path; from benchlib import append_text; "
                  "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                  "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)); "
                  f"append_text(Path(sys.argv[1]), '\\n## a block\\n' + 'x' * {block})")
        done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1] / "bench")
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert done.stderr.strip() == f"could not append to {path}: File too large; the results above were not saved"
        assert path.read_bytes() == before


def test_bench_prepare_starts_a_new_append_file_with_its_title(bench, tmp_path, monkeypatch):
    import bench_prepare

    text = tmp_path / "small.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 200, encoding="utf-8")
    monkeypatch.setattr(bench_prepare, "shakespeare_path", lambda: text)  # hermetic: no Tiny Shakespeare
    out = tmp_path / "new.md"
    monkeypatch.setattr(sys, "argv", ["bench_prepare.py", "--mb", "0.001", "--bpe-vocab", "300", "--append", str(out)])
    bench_prepare.main()  # check_append creates the file empty before measuring
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# Benchmarks"
    assert lines[2].startswith("## prepare throughput, ")
    assert lines.count("| tokenizer | seconds | MB/s | tokens |") == 1


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon to compare with")
def test_bench_muon_times_both_optimizers_and_appends_its_block(bench, tmp_path):
    import bench_muon

    out = tmp_path / "results.md"
    bench_muon.main(["--layers", "1", "--width", "8", "--steps", "1", "--passes", "1", "--append", str(out)])
    text = out.read_text(encoding="utf-8")
    assert "- command: `python bench/bench_muon.py --layers 1 --width 8 --steps 1 --passes 1 --append " in text
    assert "the blocks of 1 x 8 (4 matrices)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "Muon" in line]
    assert len(rows) == 2 and any(line.endswith("| 1.00x |") for line in rows)

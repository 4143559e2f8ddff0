"""llama.cpp's CPU tools for benchmarks/vs_llamacpp.py: built once from the llama.cpp copy vendored in the
llama-cpp-python sdist, its HF -> GGUF converter (run in a subprocess through this file's `convert`
command), llama-quantize, llama-bench / llama-batched-bench with their JSON output parsed, and a
reference run (prompt logits, greedy tokens, tokenization) through the sdist's ctypes bindings on
the built libllama (this file's `reference` command, a subprocess, so that llama.cpp's threads never
share a process with the one being timed).

Nothing here imports jax: the benchmark limits its threads before jax is imported."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

SDIST = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
TARGETS = ("llama-bench", "llama-batched-bench", "llama-quantize")
CMAKE_CONFIG = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF"]
INSTALL_HINT = "install them (Debian/Ubuntu: apt-get install cmake build-essential) and rerun"


class ToolsMissingError(RuntimeError):
    """cmake or a C++ compiler is missing, so llama.cpp cannot be built."""


class LlamaCppError(RuntimeError):
    """A llama.cpp step (download, build, conversion, quantization, benchmark) failed."""


_T0 = time.time()


def say(msg: str) -> None:
    """Print a progress line, with the seconds since this module was imported."""
    print(f"[{time.time() - _T0:5.0f}s] {msg}", flush=True)


@dataclasses.dataclass(frozen=True)
class Tools:
    """A built llama.cpp: sdist is the extracted llama-cpp-python sdist, src its vendored llama.cpp."""
    sdist: Path

    @property
    def src(self) -> Path:
        return self.sdist / "vendor" / "llama.cpp"

    @property
    def bin(self) -> Path:
        return self.src / "build" / "bin"

    def exe(self, name: str) -> str:
        return str(self.bin / name)

    def built(self) -> bool:
        return all((self.bin / t).is_file() for t in TARGETS) and (self.bin / "libllama.so").is_file()

    def commit(self) -> str:
        """The vendored llama.cpp commit: from git when the sdist carries its metadata, else the
        one the build recorded (build/common/build-info.cpp), else 'unknown'."""
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(["git", "-C", str(self.src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 check=True).stdout.strip()
            if out:
                return out
        info = self.src / "build" / "common" / "build-info.cpp"
        if info.is_file():
            for line in info.read_text().splitlines():
                if "LLAMA_COMMIT" in line and '"' in line:
                    return line.split('"')[1]
        return "unknown"

    def build_flags(self) -> dict:
        """The CMake cache entries that shape the binaries (native ISA, OpenMP, compiler)."""
        cache = self.src / "build" / "CMakeCache.txt"
        keys = ("CMAKE_BUILD_TYPE", "GGML_NATIVE", "GGML_OPENMP", "CMAKE_CXX_COMPILER", "BUILD_SHARED_LIBS")
        out = {}
        if cache.is_file():
            for line in cache.read_text().splitlines():
                name, _, value = line.partition("=")
                if name.split(":")[0] in keys:
                    out[name.split(":")[0]] = value
        return out


def ensure_tools(root: Path, cores: list[int]) -> Tools:
    """The built tools under root (downloaded and built first if needed, on `cores`, one job each;
    a lock file keeps two benchmark runs from building at once). Raises ToolsMissingError without
    cmake or a compiler."""
    tools = Tools(root / f"llama_cpp_python-{SDIST_VERSION}")
    if tools.built():
        say(f"llama.cpp tools: found in {tools.bin}")
        return tools
    missing = [n for n in ("cmake",) if shutil.which(n) is None]
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        missing.append("a C++ compiler")
    if missing:
        raise ToolsMissingError(f"building llama.cpp needs {' and '.join(missing)}: {INSTALL_HINT}")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "build.lock", "w") as lock:
        say("llama.cpp tools: waiting for the build lock" if _locked(lock) else "llama.cpp tools: building")
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tools.built():                                   # another run built them meanwhile
            return tools
        if not (tools.src / "CMakeLists.txt").is_file():
            _download_sdist(root)
        log = root / "build.log"
        build_dir = tools.src / "build"
        t0 = time.time()
        with open(log, "a") as f:
            if not (build_dir / "CMakeCache.txt").is_file():
                say(f"  cmake configure ({' '.join(CMAKE_CONFIG)}), log {log}")
                _run_logged(["cmake", "-B", "build", *CMAKE_CONFIG], tools.src, f, log, cores)
            say(f"  cmake --build -j{len(cores)} --target {' '.join(TARGETS)} (about 10-15 minutes on 2 cores)")
            _run_logged(["cmake", "--build", "build", f"-j{len(cores)}", "--target", *TARGETS], tools.src, f, log,
                        cores)
        if not tools.built():
            raise LlamaCppError(f"the build finished but {tools.bin} lacks {', '.join(TARGETS)} or libllama.so")
        say(f"  built in {time.time() - t0:.0f} s")
    return tools


def _locked(lock) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(lock, fcntl.LOCK_UN)
    return False


def _download_sdist(root: Path) -> None:
    """pip download the sdist (no binaries, no dependencies) into root and extract it there."""
    say(f"  pip download --no-binary :all: {SDIST}=={SDIST_VERSION}")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                           f"{SDIST}=={SDIST_VERSION}", "-d", str(root)], capture_output=True, text=True)
    if proc.returncode:
        raise LlamaCppError(f"pip download of {SDIST}=={SDIST_VERSION} failed:\n{proc.stderr[-2000:]}")
    archive = root / f"{SDIST.replace('-', '_')}-{SDIST_VERSION}.tar.gz"
    if not archive.is_file():
        raise LlamaCppError(f"pip download did not produce {archive}")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")


def _run_logged(cmd: list[str], cwd: Path, f, log: Path, cores: list[int]) -> None:
    """Run cmd on `cores` (not only the ones the benchmark keeps), its output appended to log."""
    f.write(f"$ {' '.join(cmd)}\n")
    f.flush()
    proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores))
    if proc.returncode:
        tail = log.read_text(errors="replace")[-3000:]
        raise LlamaCppError(f"{' '.join(cmd)} failed (log {log}):\n{tail}")


# ---- conversion and quantization ---------------------------------------------------------------------
def convert_gguf(tools: Tools, hf_dir: Path, out: Path, outtype: str) -> Path:
    """HF directory -> GGUF (outtype f32 | bf16) with the vendored convert_hf_to_gguf.py, run by this
    file's `convert` command (it maps a GPT-2 byte-level pre-tokenizer the converter does not know)."""
    if out.is_file():
        return out
    tmp = out.with_suffix(".tmp")
    proc = subprocess.run([sys.executable, __file__, "convert", str(tools.src), str(hf_dir), "--outfile", str(tmp),
                           "--outtype", outtype], capture_output=True, text=True)
    if proc.returncode or not tmp.is_file():
        raise LlamaCppError(f"convert_hf_to_gguf.py {hf_dir} ({outtype}) failed:\n{proc.stderr[-3000:]}")
    tmp.rename(out)
    return out


def quantize_experts(tools: Tools, src: Path, out: Path, qtype: str, dense: str, threads: int) -> Path:
    """An experts-only quantized GGUF: `--pure` qtype for the routed experts, attention, token
    embedding and output head kept in dense (f32 | bf16); norms and the router stay as in src."""
    if out.is_file():
        return out
    tmp = out.with_suffix(".tmp")
    cmd = [tools.exe("llama-quantize"), "--pure", "--tensor-type", f"attn_={dense}", "--token-embedding-type", dense,
           "--output-tensor-type", dense, str(src), str(tmp), qtype, str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode or not tmp.is_file():
        raise LlamaCppError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    tmp.rename(out)
    return out


def gguf_tensor_types(tools: Tools, path: Path) -> dict[str, str | dict[str, int]]:
    """{tensor kind (name without the block index: 'ffn_down_exps.weight'): its ggml type, or
    {type: count} where blocks differ}, read with the vendored gguf-py: what llama-quantize
    actually wrote, fallbacks included."""
    sys.path.insert(0, str(tools.src / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    out: dict[str, dict[str, int]] = {}
    for t in GGUFReader(str(path)).tensors:
        kind = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name
        counts = out.setdefault(kind, {})
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return {kind: next(iter(c)) if len(c) == 1 else c for kind, c in sorted(out.items())}


# ---- timing ------------------------------------------------------------------------------------------
def _run_tool(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise LlamaCppError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


def _run_json(cmd: list[str]) -> str:
    return _run_tool(cmd).stdout


def llama_bench(tools: Tools, gguf: Path, *, prompt: int, gen: int, depth: int, threads: int, reps: int) -> dict:
    """One llama-bench test (-p prompt -n gen -d depth) -> its JSON record (avg_ts, samples_ts, ...)."""
    cmd = [tools.exe("llama-bench"), "-m", str(gguf), "-p", str(prompt), "-n", str(gen), "-d", str(depth),
           "-t", str(threads), "-r", str(reps), "-o", "json"]
    records = json.loads(_run_json(cmd))
    if len(records) != 1:
        raise LlamaCppError(f"{' '.join(cmd)}: expected one result, got {len(records)}")
    return records[0]


def _json_or_none(line: str) -> dict | None:
    """line's JSON object, or None when it is not one (a log line, or a record garbled by the
    tool's own interleaved logging)."""
    if not line.startswith("{"):
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def batched_bench(tools: Tools, gguf: Path, *, prompt: int, gen: int, batch: int, threads: int,
                  attempts: int = 6) -> dict:
    """One llama-batched-bench run (-npp prompt -ntg gen -npl batch, a context that holds them all)
    -> its JSONL record (speed_tg is S_TG, decode tok/s over all sequences).

    The tool prints its result through llama.cpp's logger, whose worker thread writes it out
    asynchronously and is never joined at exit (common/log.cpp leaks it on purpose: "logs may be lost
    if not flushed before the program exits"): about one run in ten here prints nothing, or half a
    line, with exit code 0. Such a run is repeated, up to `attempts` runs in all."""
    cmd = [tools.exe("llama-batched-bench"), "-m", str(gguf), "-npp", str(prompt), "-ntg", str(gen),
           "-npl", str(batch), "-c", str(batch * (prompt + gen)), "-b", "2048", "-t", str(threads),
           "--output-format", "jsonl"]
    for attempt in range(attempts):
        proc = _run_tool(cmd)
        records = [r for r in map(_json_or_none, proc.stdout.splitlines()) if r is not None]
        if len(records) == 1:
            return records[0]
        say(f"    llama-batched-bench printed {len(records)} result lines (attempt {attempt + 1} of {attempts})")
    # batched-bench also silently skips a batch its context cannot hold
    raise LlamaCppError(f"{' '.join(cmd)}: expected one JSONL result, got {len(records)} in each of {attempts} "
                        f"runs; the last one's stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-2000:]}")


# ---- the reference run (a subprocess) -------------------------------------------------------------------
def reference(tools: Tools, gguf: Path, prompt: list[int], n_greedy: int, text: str, threads: int,
              timeout: float = 600) -> dict:
    """llama.cpp's outputs on gguf through the built libllama: logits of every prompt position (one
    batch), n_greedy greedy tokens after the prompt and the logits of each step they were chosen from
    (one token a step), and the tokenization of text (all f32, KV cache f32)."""
    args = dict(gguf=str(gguf), prompt=prompt, n_greedy=n_greedy, text=text, threads=threads)
    proc = subprocess.run([sys.executable, __file__, "reference", str(tools.sdist)], input=json.dumps(args),
                          capture_output=True, text=True, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        raise LlamaCppError(f"llama.cpp reference run on {gguf} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def _reference_main(sdist: Path) -> None:
    """Read the request (JSON) from stdin, print the result (JSON) on stdout."""
    import ctypes
    import types

    import numpy as np
    req = json.loads(sys.stdin.read())
    os.environ["LLAMA_CPP_LIB_PATH"] = str(Tools(sdist).bin)     # honoured by llama_cpp/llama_cpp.py
    pkg = types.ModuleType("llama_cpp")        # the bindings alone, without the package's high-level
    pkg.__path__ = [str(sdist / "llama_cpp")]  # imports (diskcache, jinja2)
    sys.modules["llama_cpp"] = pkg
    import llama_cpp.llama_cpp as L

    L.llama_backend_init()
    model = L.llama_model_load_from_file(req["gguf"].encode(), L.llama_model_default_params())
    if not model:
        raise LlamaCppError(f"llama_model_load_from_file({req['gguf']}) failed")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    prompt, n_greedy = req["prompt"], req["n_greedy"]
    cp = L.llama_context_default_params()
    cp.n_ctx = len(prompt) + n_greedy + 16
    cp.n_batch = cp.n_ubatch = max(len(prompt), 1)
    cp.n_threads = cp.n_threads_batch = req["threads"]
    cp.type_k = cp.type_v = 0                                      # GGML_TYPE_F32
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise LlamaCppError("llama_init_from_model failed")
    batch = L.llama_batch_init(len(prompt), 0, 1)

    def decode(tokens: list[int], start: int) -> np.ndarray:
        """Decode tokens at positions start.. (one sequence), every position's logits [n, vocab]."""
        batch.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, start + i, 1, 1
            batch.seq_id[i][0] = 0
        if L.llama_decode(ctx, batch) != 0:
            raise LlamaCppError("llama_decode failed")
        return np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(tokens), n_vocab)).copy()

    logits = decode(prompt, 0)
    steps = [logits[-1]]                       # the logits each greedy token was chosen from
    for i in range(n_greedy - 1):
        steps.append(decode([int(steps[-1].argmax())], len(prompt) + i)[0])
    greedy = [int(s.argmax()) for s in steps]
    raw = req["text"].encode()
    buf = (L.llama_token * (len(raw) + 16))()
    n = L.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, False)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    out = dict(logits=logits.tolist(), greedy=greedy, greedy_logits=np.stack(steps).tolist(),
               text_tokens=list(buf[:n]) if n >= 0 else None,
               system_info=ctypes.string_at(L.llama_print_system_info()).decode(errors="replace"))
    print(json.dumps(out))


def _convert_main(src: Path, argv: list[str]) -> None:
    """Run the vendored convert_hf_to_gguf.py with argv, unedited: only its pre-tokenizer lookup is
    wrapped, so that a tokenizer whose pre-tokenizer is byte-level with the GPT-2 regex (what the
    project's byte-level BPE tokenizers are) maps to llama.cpp's 'gpt-2' when its hash is unknown."""
    import logging
    import runpy
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    from conversion.base import TextModel
    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        logging.disable(logging.WARNING)       # its long "not recognized" banner, when it is
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if not _gpt2_byte_level(Path(self.dir_model) / "tokenizer.json"):
                raise
        finally:
            logging.disable(logging.NOTSET)
        logging.getLogger("hf-to-gguf").info("pre-tokenizer: unknown hash, byte-level with the GPT-2 regex -> 'gpt-2'")
        return "gpt-2"

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(src / "convert_hf_to_gguf.py"), *argv]
    runpy.run_path(str(src / "convert_hf_to_gguf.py"), run_name="__main__")


def _gpt2_byte_level(tokenizer_json: Path) -> bool:
    """True when tokenizer.json's pre-tokenizer is ByteLevel with its (GPT-2) regex, no prefix space."""
    if not tokenizer_json.is_file():
        return False
    pre = json.loads(tokenizer_json.read_text()).get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def _main() -> None:
    ap = argparse.ArgumentParser(description="subprocess entry points of benchmarks/vs_llamacpp.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="the vendored convert_hf_to_gguf.py with the GPT-2 pre-tokenizer mapping")
    c.add_argument("src", type=Path, help="the vendored llama.cpp directory")
    r = sub.add_parser("reference", help="logits/greedy/tokens via the ctypes bindings (request JSON on stdin)")
    r.add_argument("sdist", type=Path, help="the extracted llama-cpp-python sdist")
    args, rest = ap.parse_known_args()
    if args.cmd == "convert":
        _convert_main(args.src, rest)
    else:
        _reference_main(args.sdist)


if __name__ == "__main__":
    _main()

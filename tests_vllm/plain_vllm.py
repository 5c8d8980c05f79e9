"""Plain vLLM, no acttransport plugin (run as a subprocess with VLLM_PLUGINS=""): greedy tokens
and their log-probabilities for token-id prompts, as JSON on stdout's last line.

    python plain_vllm.py MODEL_DIR PROMPTS_JSON MAX_TOKENS
"""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
assert os.environ.get("VLLM_PLUGINS") == "", "run with VLLM_PLUGINS='' (no plugin)"
assert "ACTTRANSPORT_VLLM_MAPS" not in os.environ

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

model, prompts, n = sys.argv[1], json.loads(open(sys.argv[2]).read()), int(sys.argv[3])
llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=256 << 20, seed=0)
outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], SamplingParams(max_tokens=n, temperature=0, logprobs=0))
res = [{"tokens": list(o.outputs[0].token_ids), "logprobs": [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
       for o in outs]
print(json.dumps(res))

"""Reference side of `cargo xtask bench decode`: ModelScope's PALM `generate` on CPU.

    python decode_reference.py MODEL_DIR INPUT.jsonl BEAM BATCH

Loads the ModelScope model directory with `PalmForTextGeneration`, decodes every `src` of the
input (beam BEAM, alpha 0.95, min length 3, max length 24, BATCH sources per call) after one
warm-up call, and prints one JSON line: generated tokens, seconds, tokens/s.
"""
import json
import os
import sys
import time

import torch

torch.set_num_threads(int(os.environ.get("PALM_BENCH_THREADS", "2")))

from modelscope.models.nlp.palm_v2 import PalmConfig  # noqa: E402
from modelscope.models.nlp.palm_v2.text_generation import PalmForTextGeneration  # noqa: E402
from transformers import BertTokenizer  # noqa: E402

model_dir, input_path, beam, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config = PalmConfig.from_json_file(os.path.join(model_dir, "config.json"))
config.encoder_pth = os.path.join(model_dir, config.encoder_pth)
checkpoint = torch.load(os.path.join(model_dir, "pytorch_model.bin"), weights_only=False)
model = PalmForTextGeneration(config, checkpoint)
model.eval()
tok = BertTokenizer(os.path.join(model_dir, "vocab.txt"), do_lower_case=True)
srcs = [json.loads(line)["src"] for line in open(input_path, encoding="utf-8") if line.strip()]


def run(texts):
    n = 0
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                                 beam_size=beam, alpha=0.95, min_length=3, max_length=24)
        n += sum(len(s) for s in out.sequences)
    return n


run(srcs[:batch])
start = time.perf_counter()
tokens = run(srcs)
secs = time.perf_counter() - start
print(json.dumps({"tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs}))

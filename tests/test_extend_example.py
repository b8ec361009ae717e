"""The worked --user-dir example of docs/extending.md: a task of the user's own, registered from outside the
package, trains with fairseq-hydra-train and evaluates with fairseq-generate."""
import re
from pathlib import Path

from speechgpt_fairseq.data.vocabulary import Vocabulary
from speechgpt_fairseq.tasks.base import load_split

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "stage2" / "data-bin"


def asr_examples(split: str) -> int:
    """ASR examples of a split, counted from the text: the response (after `[SpeechGPT]:`) is not speech."""
    vocab = Vocabulary.load(DATA / "vocab.json")
    texts = [vocab.decode(load_split(str(DATA), split)[i].tolist()) for i in range(len(load_split(str(DATA), split)))]
    return sum("<sosp>" not in t.split("[SpeechGPT]:", 1)[1] for t in texts)


def test_user_task_trains_and_generates(cli, tmp_path):
    run = cli("fairseq-hydra-train", "--config-dir", REPO / "examples" / "extend", "--config-name", "asr",
              "optimization.max_update=2", "dataset.validate_interval_updates=2", "common.log_interval=1", cwd=tmp_path)
    log = run.stdout + run.stderr
    train, test = asr_examples("train"), asr_examples("test")
    assert 0 < train < len(load_split(str(DATA), "train"))
    assert re.search(rf"train: {train} samples", log) and "task: ASRSFTTask" in log
    gen = cli("fairseq-generate", DATA, "--user-dir", REPO / "examples" / "extend" / "asr_task", "--task", "asr_sft",
              "--path", tmp_path / "checkpoints" / "asr-tiny" / "checkpoint_last.pt", "--gen-subset", "test",
              "--beam", "1", "--max-len-a", "1", "--max-len-b", "40", "--batch-size", "16", cwd=tmp_path).stdout
    prompts = [line for line in gen.splitlines() if line.startswith("S-")]
    assert len(prompts) == test and all("<sosp>" in p for p in prompts)  # every prompt holds speech

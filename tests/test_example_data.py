"""The binarized data of the example configs is what scripts/make_example_data.sh makes from the bundled
corpus: shipped files can never go stale, and the script (a tutorial of the data verbs) keeps working."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_shipped_data_is_what_the_script_makes(tmp_path):
    env = dict(os.environ, SPEECHGPT=str(Path(sys.executable).parent / "speechgpt"))
    subprocess.run(["bash", str(REPO / "scripts" / "make_example_data.sh"), str(tmp_path)], check=True,
                   capture_output=True, text=True, env=env)
    for stage in ("stage1", "stage2", "stage3"):
        shipped = REPO / "examples" / stage / "data-bin"
        names = sorted(p.name for p in shipped.iterdir())
        assert names == sorted(p.name for p in (tmp_path / stage / "data-bin").iterdir()), stage
        for name in names:
            assert (shipped / name).read_bytes() == (tmp_path / stage / "data-bin" / name).read_bytes(), (stage, name)

"""benchmarks/real_images.py --quick: two methods and random init trained on a tiny class-balanced
subset of the CIFAR-10 JPEG archive (../shared/datasets; skipped where it is absent), the report's
table with the diff column and the chart written."""
import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT

ARCHIVE = ROOT.parent / "shared" / "datasets" / "cifar10-jpeg.tar.xz"


def test_help_documents_the_run():
    out = subprocess.run([sys.executable, "benchmarks/real_images.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "--quick" in out and "--epochs" in out and "The shrinking" in out


@pytest.mark.skipif(not ARCHIVE.is_file(), reason="the CIFAR-10 JPEG archive of ../shared/datasets is absent")
def test_quick_run_writes_the_table_beside_random_init(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import real_images

    out = tmp_path / "report" / "real_images"
    assert real_images.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    table = pd.read_csv(out.with_suffix(".csv"), index_col="method")
    assert set(table.index) == {"simclr", "rotnet", "random"}
    assert table.loc["simclr", "seeds"] == 2 and table.loc["random", "seeds"] == 2 and table.loc["rotnet", "seeds"] == 1
    for m in table.index:  # diff: ours minus the random init of the same backbone
        assert table.loc[m, "diff"] == pytest.approx(table.loc[m, "knn"] - table.loc["random", "knn"], abs=2e-3)
        assert 0 <= table.loc[m, "knn"] <= 100 and 0 <= table.loc[m, "linear"] <= 100
    md = out.with_suffix(".md").read_text()
    assert "python benchmarks/real_images.py --quick" in md and "| diff |" in md.replace("diff | seeds", "diff |")
    assert out.with_suffix(".png").stat().st_size > 1000
    # the subset is class-balanced: 50 training images of each of the 10 classes
    prepared = next((tmp_path / "work").glob("prepared-*"))
    import numpy as np

    y = np.load(prepared / "train_y.npy")
    assert len(y) == 500 and np.bincount(y).tolist() == [50] * 10

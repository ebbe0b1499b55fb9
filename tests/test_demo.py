"""The end-to-end demo's plumbing, in both starting regimes (python/distill_demo.py --quick)."""
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
import distill_demo  # noqa: E402

# One method per code path: monolithic, fixed-η loss (adaptive γ_t), the hook (auto: exact then EMA), VA-OPD, GRPO
# with the hook's fixed component (Eq. 22), language steering (Eq. 19-21).
METHODS = ["opd", "va-opd", "vgs-adaptive", "vgs-auto", "grpo+vgs", "lang-steer"]


@pytest.mark.slow
def test_quick_demo_both_regimes(tmp_path):
    out = str(tmp_path / "out")
    argv = ["--quick", "--regime", "blind", "grounded", "--methods", *METHODS, "--cache", "", "--out", out,
            "--threads", "1", "--steps", "3", "--eval-size", "12", "--eval-every", "3"]
    runs = distill_demo.main(argv)
    assert list(runs) == ["blind", "grounded"]
    for regime, cells in runs.items():
        assert set(cells) == {"start", *METHODS}
        start = cells["start"][0]
        assert 0 <= start["student"]["image"]["all"] <= 1 and start["probe"]
        for m in METHODS:
            (rec,) = cells[m]
            assert rec["eval_step"] == [0, 3] and all(0 <= a <= 1 for a in rec["acc_image"] + rec["acc_blank"])
            for k in ("std", "vis", "lang", "vds", "eta"):
                assert len(rec[k]) == 3 and all(math.isfinite(x) and x >= 0 for x in rec[k]), (regime, m, k)
            assert rec["probe"][-1]["bin"] == -1  # the whole-batch row closes the probe
        # every method starts from the same student: same accuracy before the first step
        assert len({cells[m][0]["acc_image"][0] for m in METHODS}) == 1
    grpo = runs["grounded"]["grpo+vgs"][0]
    assert len(grpo["reward"]) == 3 and all(0 <= r <= 1 for r in grpo["reward"]) and not runs["blind"]["opd"][0]["reward"]
    assert runs["blind"]["vgs-adaptive"][0]["eta"] == [0.41] * 3 and runs["blind"]["opd"][0]["eta"] == [1.0] * 3
    # the grounded student is the blind one trained further: it differs
    assert runs["grounded"]["start"][0]["probe"] != runs["blind"]["start"][0]["probe"]
    for name in ("summary.md", "demo_accuracy.png", "demo_losses.png", "demo_probe.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    # resumable: a second call with --resume trains nothing and reports the same runs
    again = distill_demo.main(argv + ["--resume"])
    assert again["grounded"]["opd"][0]["wall_s"] == runs["grounded"]["opd"][0]["wall_s"]

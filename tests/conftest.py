"""Suite-wide settings (offline hubs, `gpu` tests skip without CUDA) and shared fixtures.

Fixtures:
    one_thread: torch on one thread for the test (opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``).
    fake_hf_cache: an empty Hugging Face hub cache in the standard layout, ``HF_HUB_CACHE`` pointing at it.
"""

import hashlib
import os
from pathlib import Path

# Nothing may download at test time; make any accidental hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Under pytest-xdist (`make test` runs 2 workers), each worker gets its share of the cores, for torch and for
# every process a test starts (they inherit the environment). 2 workers × 1 thread beat 1 worker × 2 threads
# on the small models of the suite: their ops are too small to split.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[_var] = _threads

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(_threads))  # in case a plugin imported torch before the variable was set


def _cost(item) -> int:
    return 3 if "slurm" in item.keywords else 1 if "slow" in item.keywords else 0


def pytest_collection_modifyitems(config, items):
    # The files with the most slow (and slurm) tests first, so that `--dist loadfile` starts the long ones
    # early and the two workers finish together. The sort is stable: within a file, the order stays.
    cost: dict[str, int] = {}
    for item in items:
        cost[item.nodeid.split("::")[0]] = cost.get(item.nodeid.split("::")[0], 0) + _cost(item)
    items.sort(key=lambda item: -cost[item.nodeid.split("::")[0]])
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    # 2 shared cores: OpenMP spin-waiting with 2 threads makes small ops ~100× slower under load.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class FakeHFCache:
    """A hub cache folder laid out as ``huggingface_hub`` writes it::

        <root>/models--org--name/refs/main           the commit hash of the current snapshot
        <root>/models--org--name/snapshots/<hash>/   the files (plain files here, symlinks into blobs/ in a real one)
    """

    def __init__(self, root: Path):
        self.root = root

    def add(self, repo_id: str, files: dict[str, bytes | str] | None = None, commit: str | None = None,
            main: bool = True) -> Path:
        """Create snapshot ``commit`` (default: a hash of the repo id) of ``repo_id`` holding ``files``
        (path -> content); ``main=True`` points ``refs/main`` at it. Returns the snapshot folder."""
        commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
        repo = self.root / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for name, data in (files or {}).items():
            path = snapshot / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.encode() if isinstance(data, str) else data)
        if main:
            (repo / "refs").mkdir(exist_ok=True)
            (repo / "refs" / "main").write_text(commit)
        return snapshot


@pytest.fixture
def fake_hf_cache(tmp_path, monkeypatch) -> FakeHFCache:
    root = tmp_path / "hf_hub_cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    return FakeHFCache(root)

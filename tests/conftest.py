from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_cpu() -> Iterator[None]:
    # tiny tensors: on a busy 2-core machine two intra-op threads made tests 10-100x slower than one
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _cached_path_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    # tests count the rows of the cached path on tiny models, where timing would choose the plain path: the choice
    # is tested on its own (tests/test_encoder_check.py), with a clock of its own
    monkeypatch.setattr("lightning_mc.core.path_choice.PLAIN_IF_DEARER", None)


@pytest.fixture
def no_spot_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """No spot check of the encoder cache: for tests that count the rows of the cached path itself.

    The spot check's own rows (one per copy, once per measurement) are tested in tests/test_edges.py.
    """
    monkeypatch.setattr("lightning_mc.core.spot_check.SpotCheck.next_batch", lambda self: False)

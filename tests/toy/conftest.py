import pytest


@pytest.fixture(scope="session")
def toy_bundle(tmp_path_factory):
    """The toy model bundle, built once for the tests of this folder (with build time recorded)."""
    import time

    from mpp.toy.models import build_toy_models

    path = tmp_path_factory.mktemp("toy_bundle") / "models"
    start = time.perf_counter()
    build_toy_models(path)
    print(f"\ntoy bundle built in {time.perf_counter() - start:.1f}s")
    return path

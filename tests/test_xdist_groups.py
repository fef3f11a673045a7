"""`make test` runs `-n 2 --dist loadgroup`: tests marked `xdist_group("dist")` (the multi-process
gloo runs) must share one worker, so two of them never oversubscribe CI's 2 cores at once."""
import pytest


@pytest.mark.xdist_group("dist")
def test_loadgroup_tags_grouped_tests(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not running under pytest-xdist --dist loadgroup")
    # xdist's loadgroup scheduler sends every test whose id ends in "@<group>" to one worker.
    assert request.node.nodeid.endswith("@dist"), (
        f"xdist did not tag {request.node.nodeid!r} with its group: this pytest/pytest-xdist pair "
        "ignores xdist_group (see the pin in constraints.txt)"
    )

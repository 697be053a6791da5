"""`config.quoted`: a path given to Hydra as an override arrives as exactly that string (the demo and the
notebook pass checkpoint and output paths this way)."""

import pytest
from hydra.errors import HydraException

from chameleon_lite.config import compose_config, quoted

AWKWARD = ["/tmp/a,b/last.ckpt", "runs/multirun/x/qk_norm=True,z_loss=0.0/last.ckpt", "/tmp/x (1)/last.ckpt",
           "/tmp/it's/x", "/tmp/back\\slash/x", "/tmp/a b/[x]{y}", "/tmp/d$x/y", "C:\\dir\\", "/tmp/${x}/y",
           "a\\'b", "x\\${y}", "x\\\\${y}\\", "plain/path.ckpt"]


@pytest.mark.parametrize("path", AWKWARD)
def test_a_quoted_path_arrives_unchanged(path):
    assert compose_config("eval", [quoted("ckpt", path)]).ckpt == path


def test_the_unquoted_form_is_what_breaks():  # (why the helper exists)
    with pytest.raises(HydraException):
        compose_config("eval", ["ckpt=runs/multirun/x/qk_norm=True,z_loss=0.0/last.ckpt"])

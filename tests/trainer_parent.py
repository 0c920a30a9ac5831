"""Preloaded by the suite's shared trainer fork server (``tests/server_zygote.py``,
``TRAINER_PRELOAD``): each trainer forked from it reseeds numpy's and torch's global generators
from the OS, as a trainer of a launched site (a fresh import of both) draws its own. The
training code seeds its own generators from the OS anyway; a global one must not be the
exception that two trainers agree on (the zygote's forked sites reseed with the same
``_reseed``)."""

from __future__ import annotations

import os

from tests.server_zygote import _reseed

os.register_at_fork(after_in_child=_reseed)

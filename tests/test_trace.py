"""`runtime/trace.py`: the call-time state of one trace, and taking it back."""

from __future__ import annotations

import warnings

import pytest

from nnx_parallel import FallbackWarning
from nnx_parallel.runtime import trace


class _Fake:
    pass


def test_recording_and_take_back():
    with trace.fresh(), trace.recording() as log:
        trace.record(_Fake(), "__call__", "a")
        at = trace.mark()
        trace.record(_Fake(), "__call__", "b")
        trace.set_last_token("tok")
        trace.take_back(at)
        assert log == [("_Fake", "__call__", "a")]
        assert trace.current().token == at.token


def test_probing_records_nothing_and_nests():
    with trace.fresh(), trace.recording() as log:
        with trace.probe():
            with trace.probe():
                trace.record(_Fake(), "__call__", "a")
            assert trace.probing()
        assert not trace.probing()
        assert log == []


def test_flags_are_scoped():
    with trace.fresh():
        with trace.flagged("recomputed"):
            assert trace.has("recomputed")
            with pytest.raises(RuntimeError):
                with trace.flagged("attention"):
                    raise RuntimeError
            assert not trace.has("attention")
        assert not trace.has("recomputed")


def test_warn_once_per_trace_context():
    with trace.fresh():
        with pytest.warns(FallbackWarning, match="once"):
            trace.warn_once("k", "once", stacklevel=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            trace.warn_once("k", "once", stacklevel=2)  # not again
    with trace.fresh(), pytest.warns(FallbackWarning):
        trace.warn_once("k", "once", stacklevel=2)  # a fresh trace warns again


def test_fresh_restores_the_previous_trace():
    outer = trace.current()
    with trace.fresh() as inner:
        assert trace.current() is inner is not outer
    assert trace.current() is outer

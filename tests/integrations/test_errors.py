"""Every coral-torch error survives pickling: torch.distributed.checkpoint sends a rank's failure to
the other ranks pickled, and an error that does not unpickle there turns into an unrelated one."""

from __future__ import annotations

import inspect
import pickle

import pytest

import coral_torch.errors as errors

SAMPLES = {"stats": {"uploaded": 1}, "failures": {"k": errors.RemoteConnectionError("cut")}, "commit": "c0ffee",
           "tensors": ["w"], "bucket": "b", "candidates": ["a1", "a2"], "missing": ("x",), "needed": 7, "pid": 1,
           "errno_": 5, "filename": "f", "hash_key": "h"}
CLASSES = sorted((c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.CoralError)),
                 key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_error_pickles_with_its_message_and_attributes(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    kwargs = {p.name: SAMPLES.get(p.name, "x") for p in params
              if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "message")}
    err = cls("what went wrong; what to do", **kwargs) if params else cls("what went wrong; what to do")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and str(back) == str(err) == "what went wrong; what to do"
    assert repr(back.__dict__) == repr(err.__dict__)
    if isinstance(err, OSError):
        assert (back.errno, back.filename) == (err.errno, err.filename)

"""``compile_options``: a preset when called, OneDiffX's mutable options object when assigned to.

No compiling here: ``compile_pipe(..., backend="none")`` and ``as_options`` resolve options exactly
as an Inductor compile would, in milliseconds.
"""

from __future__ import annotations

import warnings

import pytest

import onediffx
from onediffx.compile import CompileOptions, IgnoredCompileOptionWarning, compile_options, compile_pipe, compile_state
from onediffx.compile.options import as_options
from onediffx.compile.config import CompileConfig
from onediffx.errors import ConfigError

ONEFLOW_ONLY = "attention_allow_half_precision_score_accumulation_max_m"


@pytest.fixture
def options():
    """The process-wide object, left as it was found (its assignments outlive a test otherwise)."""
    compile_options.reset()
    yield compile_options
    compile_options.reset()


def test_one_object_behind_every_import():
    from onediffx.compile.pipe import compile_options as from_pipe

    assert onediffx.compile_options is compile_options is from_pipe
    assert isinstance(compile_options, CompileOptions)


def test_callable_form_is_the_preset_with_overrides(options):
    got = options("inductor", fuse_qkv=False)
    assert isinstance(got, CompileConfig)
    assert got.backend == "inductor" and got.fuse_qkv is False and got.channels_last is True
    assert options("regional").regional is True
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        options("fast")


def test_assigned_fields_apply_and_the_rest_of_the_preset_stays(options):
    options.fuse_qkv = False
    options.components = ["unet"]
    got = as_options(options, "inductor")
    assert got == compile_options("inductor", fuse_qkv=False, components=["unet"])
    assert options.fuse_qkv is False and options.channels_last is True  # read back: assigned, else the preset
    assert as_options(options, "none").fuse_qkv is False and as_options(options, "none").backend == "none"


def test_assignments_never_reach_the_callable_form_or_the_default(options):
    """Only ``options=compile_options`` sees the assignments: other callers keep the bare preset."""
    options.fuse_qkv = False
    assert compile_options("inductor").fuse_qkv is True
    assert as_options(None, "inductor") == compile_options("inductor")


def test_unknown_attributes_are_ignored_with_one_warning_naming_them(options):
    options.fuse_qkv = False
    setattr(options, ONEFLOW_ONLY, 0)
    options.debug_level = 1
    with pytest.warns(IgnoredCompileOptionWarning) as caught:
        got = as_options(options, "inductor")
    (warning,) = caught
    assert ONEFLOW_ONLY in str(warning.message) and "debug_level" in str(warning.message)
    assert "fuse_qkv" not in str(warning.message).split("Options that apply")[0]
    assert warning.filename == __file__  # points at the caller, not at onediffx
    assert got == compile_options("inductor", fuse_qkv=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_options(options, "inductor")  # warned once: the same names stay quiet
    options.use_graph = True
    with pytest.warns(IgnoredCompileOptionWarning, match="ignored use_graph ") as caught:
        as_options(options, "inductor")
    assert len(caught) == 1 and ONEFLOW_ONLY not in str(caught[0].message)


def test_compile_pipe_accepts_the_object(options):
    """The SVD snippet's form, on a stand-in pipeline: ``backend="none"`` resolves but compiles nothing."""

    class Pipe:
        pass

    setattr(options, ONEFLOW_ONLY, 0)
    options.fuse_qkv = False
    pipe = Pipe()
    with pytest.warns(IgnoredCompileOptionWarning, match=ONEFLOW_ONLY) as caught:
        assert compile_pipe(pipe, backend="none", options=options) is pipe
    ours = [w for w in caught if issubclass(w.category, IgnoredCompileOptionWarning)]  # not the preload thread's
    assert ours[0].filename == __file__
    assert compile_state(pipe).options.fuse_qkv is False and compile_state(pipe).options.backend == "none"


def test_wrong_types_name_the_option(options):
    options.fuse_qkv = "sometimes"
    with pytest.raises(ConfigError, match=r"compile_options\.fuse_qkv: .*'sometimes'"):
        as_options(options, "inductor")


def test_reset_forgets_assignments_and_warnings(options):
    setattr(options, ONEFLOW_ONLY, 0)
    options.fuse_qkv = False
    with pytest.warns(IgnoredCompileOptionWarning):
        as_options(options, "inductor")
    options.reset()
    assert options.assigned == {} and as_options(options, "inductor") == compile_options("inductor")
    setattr(options, ONEFLOW_ONLY, 0)
    with pytest.warns(IgnoredCompileOptionWarning, match=ONEFLOW_ONLY):
        as_options(options, "inductor")


def test_own_objects_are_independent(options):
    mine = CompileOptions()
    mine.fuse_qkv = False
    assert compile_options.assigned == {} and mine.assigned == {"fuse_qkv": False}
    del mine.fuse_qkv
    assert mine.assigned == {}
    with pytest.raises(AttributeError, match="no option 'nonsense'"):
        mine.nonsense  # noqa: B018
    with pytest.raises(AttributeError):
        mine._assigned_elsewhere = 1

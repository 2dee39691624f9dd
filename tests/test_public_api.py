"""The public API, pinned: ``lightning_hessian.__all__``, every exported function's and constructor's
signature (parameter names, order, kinds and defaults; not the annotations, which may be re-spelled),
the public members of the exported classes, the result dataclasses' fields and the logged names of
``HessianReport.scalars()``.

Every literal below was copied from the code when it was written. A failure here means the public API
changed: if that is intended, update the literal in the same change and say so in its message.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import pytest
import torch

import lightning_hessian as lh
from tests.helpers import sample_report

POS = "POSITIONAL_OR_KEYWORD"  # inspect.Parameter kinds, by name
KW = "KEYWORD_ONLY"
REQUIRED = "<required>"

ALL = [
    "BlockReport",
    "EigenResult",
    "GradientGeometry",  # added (training dynamics): gradient alignment, curvature, batch sharpness
    "HessianCallback",
    "HessianConvergenceWarning",
    "HessianOperator",
    "HessianReport",
    "HessianTooLargeError",
    "Landscape",  # added (training dynamics): the loss along the top eigenvectors
    "MatrixOperator",
    "NonFiniteHessianError",
    "ParameterSpace",
    "ShardedHessianOperator",  # added (sharded models): the Hessian of an FSDP2 module on local shards
    "SpectralDensity",
    "StabilityResult",  # added (training dynamics): the optimizer's edge of stability
    "SymmetricOperator",
    "TraceResult",
    "analyze",
    "eigenspace_overlap",  # added (training dynamics)
    "eigenvalues",
    "gradient_geometry",  # added (training dynamics)
    "hessian",
    "infer_batch_size",
    "loss_landscape",  # added (training dynamics)
    "resolve_blocks",
    "select_parameters",
    "spectral_density",
    "stability",  # added (training dynamics)
    "trace",
]


def test_all_is_exactly_the_pinned_names():
    assert sorted(lh.__all__) == ALL
    assert len(lh.__all__) == len(set(lh.__all__))
    for name in ALL:
        assert getattr(lh, name) is not None, name


def _parameters(obj) -> list[tuple[str, str, str]]:
    """``(name, kind, repr of the default)`` of every parameter, without ``self``."""
    out = [
        (name, p.kind.name, REQUIRED if p.default is inspect.Parameter.empty else repr(p.default))
        for name, p in inspect.signature(obj).parameters.items()
    ]
    return out[1:] if out and out[0][0] == "self" else out


def _resolve(path: str):
    obj = lh
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


SIGNATURES = {
    "analyze": [
        ("model", POS, REQUIRED),
        ("loss_fn", POS, "None"),
        ("data", POS, "None"),
        ("params", KW, "None"),
        ("blocks", KW, "None"),
        ("top_k", KW, "3"),
        ("min_eigenvalue", KW, "True"),
        ("trace", KW, "True"),
        ("density", KW, "True"),
        ("method", KW, "'auto'"),
        ("dense_limit", KW, "1024"),
        ("mode", KW, "'eval'"),
        ("dtype", KW, "None"),
        ("seed", KW, "0"),
        ("batch_size_fn", KW, "None"),
        ("tol", KW, "0.0001"),
        ("max_matvecs", KW, "None"),
        ("trace_method", KW, "'hutch++'"),
        ("trace_matvecs", KW, "99"),
        ("density_probes", KW, "4"),
        ("density_steps", KW, "32"),
        ("eigenvectors", KW, "False"),
        ("hvp", KW, "'auto'"),
        ("reduction", KW, "'mean'"),  # added: sum-reduced losses over several batches
        ("krylov", KW, "'separate'"),  # added: one shared Krylov space per block
        ("keep_vectors", KW, "0"),  # added: Ritz vectors kept for warm starts
        ("gradient_geometry", KW, "False"),  # added (training dynamics)
        ("landscape", KW, "False"),  # added (training dynamics)
        ("landscape_points", KW, "21"),  # added (training dynamics)
        ("optimizer", KW, "None"),  # added (training dynamics): each block's stability
        ("process_group", KW, "'auto'"),
        ("progress", KW, "None"),
    ],
    # Added with the training dynamics (issue 11).
    "stability": [
        ("op", POS, REQUIRED),
        ("optimizer", POS, REQUIRED),
        ("tol", KW, "0.0001"),
        ("max_matvecs", KW, "None"),
        ("seed", KW, "0"),
        ("top", KW, "None"),
    ],
    "gradient_geometry": [
        ("op", POS, REQUIRED),
        ("eigenvectors", POS, "None"),
    ],
    "eigenspace_overlap": [
        ("previous", POS, REQUIRED),
        ("current", POS, REQUIRED),
        ("op", KW, "None"),  # added (sharded models): the operator whose vectors are local shards
    ],
    "loss_landscape": [
        ("op", POS, REQUIRED),
        ("directions", POS, REQUIRED),
        ("num_points", KW, "21"),
        ("radius", KW, "None"),
    ],
    "hessian": [
        ("model", POS, REQUIRED),
        ("loss_fn", POS, REQUIRED),
        ("data", POS, REQUIRED),
        ("params", KW, "None"),
        ("blocks", KW, "None"),
        ("mode", KW, "'eval'"),
        ("dtype", KW, "None"),
        ("batch_size_fn", KW, "None"),
        ("hvp", KW, "'auto'"),
        ("chunk_size", KW, "None"),
        ("reduction", KW, "'mean'"),  # added: sum-reduced losses over several batches
    ],
    "eigenvalues": [
        ("op", POS, REQUIRED),
        ("k", POS, "1"),
        ("which", POS, "'largest'"),
        ("tol", KW, "0.0001"),
        ("max_matvecs", KW, "None"),
        ("return_vectors", KW, "False"),
        ("seed", KW, "0"),
        ("block_size", KW, "1"),
        ("max_basis", KW, "None"),
        ("check_multiplicity", KW, "True"),
    ],
    "trace": [
        ("op", POS, REQUIRED),
        ("method", POS, "'hutch++'"),
        ("num_matvecs", POS, "99"),
        ("seed", KW, "0"),
        ("chunk_size", KW, "None"),
    ],
    "spectral_density": [
        ("op", POS, REQUIRED),
        ("num_probes", POS, "8"),
        ("num_steps", POS, "40"),
        ("seed", KW, "0"),
    ],
    "infer_batch_size": [
        ("batch", POS, REQUIRED),
    ],
    "select_parameters": [
        ("model", POS, REQUIRED),
        ("params", POS, "None"),
    ],
    "resolve_blocks": [
        ("names", POS, REQUIRED),
        ("blocks", POS, REQUIRED),
    ],
    "HessianOperator.__init__": [
        ("model", POS, REQUIRED),
        ("loss_fn", POS, "None"),
        ("data", POS, "None"),
        ("params", KW, "None"),
        ("mode", KW, "'eval'"),
        ("dtype", KW, "None"),
        ("batch_size_fn", KW, "None"),
        ("hvp", KW, "'auto'"),
        ("cache_graphs", KW, "'auto'"),
        ("chunk_size", KW, "None"),
        ("process_group", KW, "'auto'"),
        ("reduction", KW, "'mean'"),  # added: sum-reduced losses over several batches
    ],
    # added (sharded models): HessianOperator's arguments that apply to a sharded module
    "ShardedHessianOperator.__init__": [
        ("model", POS, REQUIRED),
        ("loss_fn", POS, "None"),
        ("data", POS, "None"),
        ("params", KW, "None"),
        ("mode", KW, "'eval'"),
        ("dtype", KW, "None"),
        ("batch_size_fn", KW, "None"),
        ("hvp", KW, "'auto'"),
        ("process_group", KW, "'auto'"),
        ("reduction", KW, "'mean'"),
    ],
    "HessianCallback.__init__": [
        ("every_n_epochs", POS, "None"),
        ("epochs", POS, "None"),
        ("every_n_steps", POS, "None"),
        ("evaluate_at_end", POS, "True"),
        ("data", POS, "'train'"),
        ("num_batches", POS, "4"),
        ("params", POS, "None"),
        ("blocks", POS, "None"),
        ("top_k", POS, "3"),
        ("min_eigenvalue", POS, "True"),
        ("trace", POS, "True"),
        ("density", POS, "True"),
        ("loss_fn", POS, "None"),
        ("mode", POS, "'eval'"),
        ("dtype", POS, "None"),
        ("seed", POS, "0"),
        ("method", POS, "'auto'"),
        ("dense_limit", POS, "1024"),
        ("analyze_kwargs", POS, "None"),
        ("on_error", POS, "'warn'"),
        ("histograms", POS, "True"),
        ("figures", POS, "True"),
        ("histogram_bins", POS, "64"),
        ("save_reports", POS, "False"),
        ("progress_bar", POS, "True"),
        ("batch_size_fn", POS, "None"),
        ("max_overhead", POS, "None"),  # added: the overhead budget
        ("warm_start", POS, "False"),  # added: start from the previous evaluation's Ritz vectors
        ("stability", POS, "True"),  # added (training dynamics)
        ("gradient_geometry", POS, "True"),  # added (training dynamics)
        ("eigenvector_overlap", POS, "True"),  # added (training dynamics)
        ("landscape", POS, "False"),  # added (training dynamics)
    ],
    "MatrixOperator.__init__": [
        ("matrix", POS, REQUIRED),
    ],
    "ParameterSpace.__init__": [
        ("names", POS, REQUIRED),
        ("shapes", POS, REQUIRED),
    ],
    "HessianOperator.restrict": [
        ("names", POS, REQUIRED),
    ],
    "HessianOperator.loss": [
        ("displacement", POS, "None"),  # added (training dynamics): the loss landscape
    ],
    "HessianOperator.gradient": [],  # added (training dynamics)
    "HessianOperator.for_batch": [  # added (training dynamics): batch sharpness
        ("index", POS, REQUIRED),
    ],
    "HessianOperator.matvec": [
        ("vector", POS, REQUIRED),
    ],
    "HessianOperator.matmat": [
        ("matrix", POS, REQUIRED),
    ],
    "HessianOperator.block_products": [
        ("rows", POS, REQUIRED),
        ("support", POS, "None"),
        ("targets", POS, "None"),
        ("out", KW, "None"),
    ],
    "HessianOperator.to_dense": [],
    "HessianOperator.chunk_columns": [],
    "HessianOperator.release_graphs": [],
    "HessianOperator.agreed_all_reduce": [
        ("local", POS, REQUIRED),
        ("shape", POS, REQUIRED),
        ("dtype", POS, "None"),
        ("what", POS, "'A Hessian-vector product'"),
    ],
    "HessianOperator.__matmul__": [
        ("other", POS, REQUIRED),
    ],
    "ParameterSpace.from_tensors": [
        ("tensors", POS, REQUIRED),
    ],
    "ParameterSpace.slices": [],
    "ParameterSpace.flatten": [
        ("tensors", POS, REQUIRED),
    ],
    "ParameterSpace.unflatten": [
        ("flat", POS, REQUIRED),
    ],
    "ParameterSpace.subspace": [
        ("names", POS, REQUIRED),
    ],
    "MatrixOperator.to_dense": [],
    "HessianCallback.state_dict": [],
    "HessianCallback.load_state_dict": [
        ("state_dict", POS, REQUIRED),
    ],
    "HessianReport.scalars": [
        ("prefix", POS, "'hessian'"),
    ],
    # Added with the plain-data report files (nothing unpickled on load): to_dict/from_dict, save/load.
    "HessianReport.to_dict": [],
    "HessianReport.from_dict": [
        ("data", POS, REQUIRED),
    ],
    "HessianReport.save": [
        ("path", POS, REQUIRED),
    ],
    "HessianReport.load": [
        ("path", POS, REQUIRED),
        ("trusted", KW, "False"),
        ("map_location", KW, "'cpu'"),
    ],
    "SpectralDensity.pdf": [
        ("grid", POS, REQUIRED),
        ("sigma", POS, "None"),
    ],
    "SpectralDensity.histogram": [
        ("bins", POS, "64"),
    ],
}


@pytest.mark.parametrize("path", list(SIGNATURES))
def test_signature_is_pinned(path):
    assert _parameters(_resolve(path)) == SIGNATURES[path]


def test_every_exported_function_and_constructor_is_pinned():
    functions = [name for name in ALL if inspect.isfunction(getattr(lh, name))]
    assert functions and all(name in SIGNATURES for name in functions), functions
    for name in ("HessianOperator", "HessianCallback", "MatrixOperator", "ParameterSpace"):
        assert f"{name}.__init__" in SIGNATURES, name


# --------------------------------------------------------------------------- members of the classes

HESSIAN_OPERATOR_METHODS = [
    "agreed_all_reduce",
    "block_products",
    "chunk_columns",  # added by the restructuring: the dense path's chunk width, public instead of private
    "for_batch",  # added (training dynamics): one batch's Hessian, for the batch sharpness
    "gradient",  # added (training dynamics)
    "loss",
    "matmat",
    "matvec",
    "release_graphs",
    "restrict",
    "to_dense",
]
# `choice` was an instance attribute and is now a read-only property with the same value.
# `depends_on_parameters` is new: a block may hold parameters the loss never uses (a zero Hessian).
HESSIAN_OPERATOR_PROPERTIES = [
    "choice",
    "depends_on_parameters",
    "device",
    "dtype",
    "num_batches",
    "parameters",
    "shape",
]


def _public(cls) -> list[str]:
    return sorted(name for name in dir(cls) if not name.startswith("_"))


def test_hessian_operator_members_are_pinned():
    assert _public(lh.HessianOperator) == sorted(HESSIAN_OPERATOR_METHODS + HESSIAN_OPERATOR_PROPERTIES)
    for name in HESSIAN_OPERATOR_METHODS:
        assert inspect.isfunction(inspect.getattr_static(lh.HessianOperator, name)), name
    for name in HESSIAN_OPERATOR_PROPERTIES:
        member = inspect.getattr_static(lh.HessianOperator, name)
        assert isinstance(member, property) and member.fset is None, name  # read-only
    assert callable(lh.HessianOperator.__matmul__)
    pinned = {path.split(".")[1] for path in SIGNATURES if path.startswith("HessianOperator.")}
    assert pinned == {"__init__", "__matmul__", *HESSIAN_OPERATOR_METHODS}


def test_other_class_members_are_pinned():
    assert _public(lh.MatrixOperator) == ["device", "dtype", "shape", "to_dense"]
    for name in ("device", "dtype", "shape"):
        assert isinstance(inspect.getattr_static(lh.MatrixOperator, name), property), name
    assert _public(lh.SymmetricOperator) == ["device", "dtype", "shape"]
    assert _public(lh.ParameterSpace) == [
        "flatten",
        "from_tensors",
        "numel",
        "sizes",
        "slices",
        "subspace",
        "unflatten",
    ]
    assert [f.name for f in dataclasses.fields(lh.ParameterSpace)] == ["names", "shapes"]
    assert isinstance(inspect.getattr_static(lh.ParameterSpace, "from_tensors"), classmethod)
    for name in ("numel", "sizes"):  # read-only attributes, computed once (cached_property)
        assert isinstance(inspect.getattr_static(lh.ParameterSpace, name), functools.cached_property), name
    own = sorted(
        name
        for name in vars(lh.HessianCallback)
        if not name.startswith("_") and not name.startswith("on_") and name not in ("setup", "teardown")
    )
    # The analysis settings were instance attributes and are now read-only views of `settings`.
    settings = ["blocks", "dense_limit", "density", "dtype", "method", "min_eigenvalue", "mode", "params"]
    settings += ["seed", "top_k", "trace"]
    settings += ["gradient_geometry", "landscape"]  # added (training dynamics)
    assert own == sorted(
        ["batches", "batches_fingerprint", "load_state_dict", "state_dict", "state_key", *settings]
    )
    for name in ("batches", "batches_fingerprint", "state_key"):
        assert isinstance(inspect.getattr_static(lh.HessianCallback, name), property), name
    callback = lh.HessianCallback()
    assert (callback.history, callback.last_report) == ([], None)
    assert (callback.batches, callback.batches_fingerprint) == ([], None)
    assert set(callback.state_dict()) == {"history", "last_step", "fingerprint", "num_batches"}


def test_errors_and_warnings_keep_their_bases():
    assert issubclass(lh.HessianTooLargeError, MemoryError)
    assert issubclass(lh.NonFiniteHessianError, FloatingPointError)
    assert issubclass(lh.HessianConvergenceWarning, UserWarning)


# --------------------------------------------------------------------------- results

RESULT_FIELDS = {
    "EigenResult": [
        ("values", REQUIRED),
        ("vectors", REQUIRED),
        ("converged", REQUIRED),
        ("residuals", REQUIRED),
        ("num_matvecs", REQUIRED),
        ("which", "'largest'"),
        ("tol", "0.0"),
    ],
    "TraceResult": [
        ("value", REQUIRED),
        ("stderr", REQUIRED),
        ("num_matvecs", REQUIRED),
        ("method", REQUIRED),
    ],
    "SpectralDensity": [
        ("nodes", REQUIRED),
        ("weights", REQUIRED),
        ("num_matvecs", "0"),
        ("num_probes", "0"),
        ("exact", "False"),
    ],
    "BlockReport": [
        ("name", REQUIRED),
        ("size", REQUIRED),
        ("method", REQUIRED),
        ("eigenvalues", "None"),
        ("min_eigenvalue", "None"),
        ("trace", "None"),
        ("density", "None"),
        ("spectrum", "None"),
        ("num_matvecs", "0"),
        ("seconds", "0.0"),
        ("ritz_vectors", "None"),  # added: warm starts of the shared Krylov space
        ("stability", "None"),  # added (training dynamics)
        ("gradient_geometry", "None"),  # added (training dynamics)
        ("eigenvector_overlap", "None"),  # added (training dynamics)
        ("landscape", "None"),  # added (training dynamics)
        ("hvp", "None"),  # added: the product method the block used (exact or gradient differences)
    ],
    "StabilityResult": [
        ("value", REQUIRED),
        ("eigenvalue", REQUIRED),
        ("threshold", REQUIRED),
        ("optimizer", REQUIRED),
        ("adaptive", REQUIRED),
        ("converged", REQUIRED),
        ("num_matvecs", REQUIRED),
    ],
    "GradientGeometry": [
        ("gradient_norm", REQUIRED),
        ("alignment", REQUIRED),
        ("curvature", REQUIRED),
        ("batch_sharpness", REQUIRED),
        ("num_batches", REQUIRED),
        ("num_matvecs", REQUIRED),
    ],
    "Landscape": [
        ("offsets", REQUIRED),
        ("losses", REQUIRED),
        ("curvatures", REQUIRED),
        ("slopes", REQUIRED),
        ("loss", REQUIRED),
        ("num_forward", REQUIRED),
    ],
    "HessianReport": [
        ("blocks", "<factory dict>"),
        ("loss", "nan"),
        ("num_samples", "0"),
        ("num_matvecs", "0"),
        ("seconds", "0.0"),
    ],
}


def _fields(cls) -> list[tuple[str, str]]:
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = f"<factory {f.default_factory.__name__}>"
        else:
            default = REQUIRED
        out.append((f.name, default))
    return out


@pytest.mark.parametrize("name", list(RESULT_FIELDS))
def test_result_fields_are_pinned(name):
    assert _fields(getattr(lh, name)) == RESULT_FIELDS[name]


RESULT_METHODS = {
    "EigenResult": ["all_converged"],
    "TraceResult": [],
    "SpectralDensity": ["histogram", "mean", "pdf"],
    "BlockReport": [],
    "StabilityResult": [],
    "GradientGeometry": [],
    "Landscape": ["quadratic_model"],
    # from_dict, load, save and to_dict: added with the plain-data report files.
    "HessianReport": ["from_dict", "load", "non_finite", "save", "scalars", "to_dict"],
}
CLASSMETHODS = ("from_dict", "load")


@pytest.mark.parametrize("name", list(RESULT_METHODS))
def test_result_members_besides_the_fields_are_pinned(name):
    cls = getattr(lh, name)
    fields = {f.name for f in dataclasses.fields(cls)}
    assert [n for n in _public(cls) if n not in fields] == RESULT_METHODS[name]
    for member in RESULT_METHODS[name]:
        kind = property if member in ("all_converged", "mean") else type(lambda: None)
        kind = classmethod if member in CLASSMETHODS else kind
        assert isinstance(inspect.getattr_static(cls, member), kind), member


# --------------------------------------------------------------------------- the logged names


def test_scalars_follow_the_logged_name_contract():
    """``hessian/<block>/trace``, ``trace_stderr``, ``eigenvalue_1`` ... ``eigenvalue_k``,
    ``eigenvalue_min``, ``eigenvalues_converged``, per block in order, only for the metrics a block has;
    values as plain floats. (``trace_stderr`` and ``eigenvalues_converged`` were added: the uncertainty
    of each value, logged next to it.)"""
    scalars = sample_report().scalars()
    assert list(scalars.items()) == [
        ("hessian/a/trace", 1.75),
        ("hessian/a/trace_stderr", 0.0),
        ("hessian/a/eigenvalue_1", 2.0),
        ("hessian/a/eigenvalue_2", 0.25),
        ("hessian/a/eigenvalue_min", -0.5),
        ("hessian/a/eigenvalues_converged", 1.0),
        ("hessian/b/eigenvalue_1", 3.0),
        ("hessian/b/eigenvalues_converged", 1.0),
    ]
    assert all(type(value) is float for value in scalars.values())


def test_scalars_of_a_small_hand_built_report():
    eigen = lh.EigenResult(
        torch.tensor([5.0, 4.0, 1.0]), None, torch.ones(3, dtype=torch.bool), torch.zeros(3), 7
    )
    smallest = lh.EigenResult(
        torch.tensor([-2.0]), None, torch.ones(1, dtype=torch.bool), torch.zeros(1), 3, which="smallest"
    )
    report = lh.HessianReport(
        blocks={
            "conv1": lh.BlockReport(
                "conv1", 10, "iterative", eigenvalues=eigen, trace=lh.TraceResult(8.0, 0.5, 9, "hutch++")
            ),
            "fc": lh.BlockReport("fc", 4, "dense", min_eigenvalue=smallest),
        },
        loss=1.5,
    )
    assert report.scalars() == {
        "hessian/conv1/trace": 8.0,
        "hessian/conv1/trace_stderr": 0.5,
        "hessian/conv1/eigenvalue_1": 5.0,
        "hessian/conv1/eigenvalue_2": 4.0,
        "hessian/conv1/eigenvalue_3": 1.0,
        "hessian/conv1/eigenvalues_converged": 1.0,
        "hessian/fc/eigenvalue_min": -2.0,
        "hessian/fc/eigenvalues_converged": 1.0,
    }
    assert list(report.scalars("h")) == [
        "h/conv1/trace",
        "h/conv1/trace_stderr",
        "h/conv1/eigenvalue_1",
        "h/conv1/eigenvalue_2",
        "h/conv1/eigenvalue_3",
        "h/conv1/eigenvalues_converged",
        "h/fc/eigenvalue_min",
        "h/fc/eigenvalues_converged",
    ]


def test_training_dynamics_names_follow_the_contract():
    """Added with the training dynamics: after a block's eigenvalue names, in this order, each only
    when measured (``preconditioned_eigenvalue_1`` for adaptive optimizers only)."""
    report = sample_report()
    block = report.blocks["b"]
    block.stability = lh.StabilityResult(0.5, 19.0, 38.0, "Adam", True, True, 12)
    block.gradient_geometry = lh.GradientGeometry(1.0, 0.25, 2.0, 3.0, 4, 2.0)
    block.eigenvector_overlap = 0.75
    assert list(report.scalars().items())[-8:] == [
        ("hessian/b/eigenvalue_1", 3.0),
        ("hessian/b/eigenvalues_converged", 1.0),
        ("hessian/b/stability", 0.5),
        ("hessian/b/preconditioned_eigenvalue_1", 19.0),
        ("hessian/b/gradient_alignment", 0.25),
        ("hessian/b/gradient_curvature", 2.0),
        ("hessian/b/batch_sharpness", 3.0),
        ("hessian/b/eigenvector_overlap", 0.75),
    ]
    block.stability = lh.StabilityResult(0.5, 1.0, 2.0, "SGD", False, True, 0)
    block.gradient_geometry.alignment = None  # no eigenvectors: no alignment
    names = list(report.scalars())
    assert (
        "hessian/b/preconditioned_eigenvalue_1" not in names and "hessian/b/gradient_alignment" not in names
    )

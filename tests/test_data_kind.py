"""Three kinds of data -- real, the generated demo tree, the rehearsal corpus (synthetic speech, real
models) -- recognised from the folders and the runs, and never put side by side."""

import json

import pytest

from local import data_kind

from conftest import RECIPE  # noqa: F401  (puts the recipe on sys.path)


def test_kind_of_a_folder_comes_from_the_first_marker_above_it(tmp_path):
    assert data_kind.of_folder(tmp_path) == data_kind.REAL
    (tmp_path / "corpus" / "cross_testing" / "F02").mkdir(parents=True)
    (tmp_path / "corpus" / "corpus.json").write_text(json.dumps({"fingerprint": "x"}))
    from local.rehearsal_build import mark

    mark(tmp_path / "corpus")
    assert data_kind.of_folder(tmp_path / "corpus" / "cross_testing" / "F02") == data_kind.REHEARSAL
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "SYNTHETIC.json").write_text("{}")
    assert data_kind.of_folder(tmp_path / "demo") == data_kind.DEMO


def test_kind_of_a_run_and_of_older_runs():
    assert data_kind.of_info({"data_kind": "rehearsal", "synthetic_data": True}) == data_kind.REHEARSAL
    assert data_kind.of_info({"synthetic_data": True}) == data_kind.DEMO  # written before data_kind
    assert data_kind.of_info({"synthetic_data": False}) == data_kind.REAL


def test_tables_and_reports_refuse_two_kinds():
    import make_tables

    from local.report import Run, runs_kind

    with pytest.raises(make_tables.TableError, match="rehearsal"):
        make_tables._data_line([{"data_kind": "rehearsal"}, {"synthetic_data": True}])
    assert "Rehearsal corpus" in make_tables._data_line([{"data_kind": "rehearsal", "synthetic_data": True}])
    runs = [Run(name=str(k), info=info, systems={}, ids=[], ref=None, categories=[])
            for k, info in enumerate(({"data_kind": "rehearsal"}, {"synthetic_data": False}))]  # fmt: skip
    with pytest.raises(ValueError, match="different data"):
        runs_kind(runs)

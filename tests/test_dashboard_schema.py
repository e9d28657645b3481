"""configs/monitoring/dashboard.json against Grafana's own dashboard schema (@grafana/schema, the
types Grafana generates from its CUE dashboard kind), checked by the TypeScript compiler: see
tests/grafana/schema_check.py. ``make test`` installs the pinned toolchain (``make grafana-schema``);
without it these tests fail and say how to install it.

The second test breaks the dashboard in each way the check is meant to catch and requires a problem
that names the broken field, so a check that passes everything fails here.
"""

from __future__ import annotations

import copy
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "tests" / "grafana"))
import schema_check
from test_monitoring import dashboard

def first(board: dict, kind: str) -> dict:
    return next(p for p in board["panels"] if p["type"] == kind)


def _tools():
    try:
        schema_check.tsc()
    except schema_check.ToolMissing as e:
        pytest.fail(str(e))


def test_the_dashboard_conforms_to_grafanas_dashboard_schema():
    _tools()
    board = dashboard()
    assert schema_check.check({"dashboard.json": board}) == {"dashboard.json": []}
    # the schema checked is the one the dashboard declares: no migration on import
    assert board["schemaVersion"] == schema_check.schema_version()


def _misspelt_top_level(d):
    d["pannels"] = d.pop("panels")


def _string_height(d):
    first(d, "timeseries")["gridPos"]["h"] = "8"


def _row_without_collapsed(d):
    del first(d, "row")["collapsed"]


def _unknown_variable_type(d):
    d["templating"]["list"][1]["type"] = "customs"


def _bad_legend_mode(d):
    first(d, "timeseries")["options"]["legend"] = {"displayMode": "bogus", "placement": "bottom"}


def _bad_stat_color_mode(d):
    first(d, "stat")["options"]["colorMode"] = "rainbow"


def _bad_custom_field(d):
    first(d, "timeseries")["fieldConfig"]["defaults"]["custom"] = {"lineWidth": "thick"}


def _unknown_panel_field(d):
    first(d, "timeseries")["datasorce"] = {"type": "prometheus"}


def _panel_type_without_schema(d):
    first(d, "timeseries")["type"] = "graph-old"


def _grid_without_width(d):
    del first(d, "table")["gridPos"]["w"]


def _datasource_as_string(d):
    first(d, "stat")["datasource"] = "${datasource}"


BREAKS = {  # how the dashboard is broken -> (change, a word the problem must name)
    "a misspelt top-level field": (_misspelt_top_level, "pannels"),
    "a grid height as a string": (_string_height, "string"),
    "a row without collapsed": (_row_without_collapsed, "collapsed"),
    "a variable type outside the enum": (_unknown_variable_type, "customs"),
    "a legend display mode outside the enum": (_bad_legend_mode, "bogus"),
    "a stat color mode outside the enum": (_bad_stat_color_mode, "rainbow"),
    "a field option of the wrong type": (_bad_custom_field, "lineWidth"),
    "a misspelt panel field": (_unknown_panel_field, "datasorce"),
    "a panel type with no schema": (_panel_type_without_schema, "graph-old"),
    "a grid position without a width": (_grid_without_width, "w"),
    "an old-style string datasource": (_datasource_as_string, "string"),
}


def test_the_schema_check_finds_each_kind_of_mistake():
    _tools()
    boards = {"unchanged": dashboard()}
    for name, (change, _) in BREAKS.items():
        board = copy.deepcopy(boards["unchanged"])
        change(board)
        boards[name] = board
    found = schema_check.check(boards)
    assert found["unchanged"] == []
    missed = {name: found[name] for name, (_, word) in BREAKS.items()
              if not any(word in problem for problem in found[name])}
    assert not missed, f"the schema check missed: {missed}"

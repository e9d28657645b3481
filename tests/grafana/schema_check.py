"""Check Grafana dashboards against Grafana's own dashboard schema, with no Grafana server.

Grafana defines its dashboard model as a CUE kind and publishes the TypeScript types generated from
it in ``@grafana/schema`` (Apache-2.0, npm). That package also carries the options schema of every
core panel plugin (``raw/composable/<panel>/panelcfg``). This module writes each dashboard out as a
TypeScript object literal typed with those types and runs the TypeScript compiler over it. An object
literal gets TypeScript's excess-property check at every depth, so the check reports:

- a field the schema does not have (a misspelt ``gridPos`` or ``schemaVersion``),
- a value of the wrong type (a string height, ``collapsed: "no"``),
- a required field left out (a row's ``panels``, a grid position's ``h``),
- a value outside an enumeration (a variable ``type`` of ``"query2"``, a legend ``displayMode`` of
  ``"bogus"``).

Panel ``options`` and ``fieldConfig.defaults.custom`` are checked against their panel type's
schema, with every field optional: Grafana fills in defaults on import, so ``options: {}`` is
valid. A panel type with no schema in the package is an error.

The toolchain is pinned in ``package.json`` and ``package-lock.json`` beside this file;
``make grafana-schema`` (part of ``make test``) installs it with ``npm ci``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TSC = HERE / "node_modules" / "typescript" / "bin" / "tsc"
SCHEMA = "@grafana/schema/dist/esm/raw"
# a panel type -> the module of its options schema in @grafana/schema
PANEL_SCHEMAS = {
    "timeseries": "composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen",
    "stat": "composable/stat/panelcfg/x/StatPanelCfg_types.gen",
    "table": "composable/table/panelcfg/x/TablePanelCfg_types.gen",
    "gauge": "composable/gauge/panelcfg/x/GaugePanelCfg_types.gen",
    "bargauge": "composable/bargauge/panelcfg/x/BarGaugePanelCfg_types.gen",
    "piechart": "composable/piechart/panelcfg/x/PieChartPanelCfg_types.gen",
    "text": "composable/text/panelcfg/x/TextPanelCfg_types.gen",
    "heatmap": "composable/heatmap/panelcfg/x/HeatmapPanelCfg_types.gen",
}
# Grafana's string enums are TypeScript enums; JSON holds their values, so the checked type maps an
# enum to the union of its values (`${E}`). Json<T> keeps which fields are required, Loose<T> makes
# every field optional (panel options, which Grafana completes with defaults).
PRELUDE = """\
type Json<T> = T extends string ? `${T}` : T extends (infer U)[] ? Json<U>[]
  : T extends object ? { [K in keyof T]: Json<T[K]> } : T;
type Loose<T> = T extends string ? `${T}` : T extends (infer U)[] ? Loose<U>[]
  : T extends object ? { [K in keyof T]?: Loose<T[K]> } : T;
"""
# the panel types whose schema has per-field options (fieldConfig.defaults.custom)
WITH_FIELD_CONFIG = {"timeseries", "table", "heatmap", "piechart", "bargauge"}
PLACEHOLDER = "\u0000panels\u0000"
TSCONFIG = {
    "compilerOptions": {
        "strict": True, "noEmit": True, "skipLibCheck": True, "target": "es2022", "module": "esnext",
        "moduleResolution": "bundler", "types": [],
    },
}


class ToolMissing(RuntimeError):
    pass


def tsc() -> list[str]:
    node = shutil.which("node")
    if node is None or not TSC.exists():
        raise ToolMissing(
            "the dashboard schema check needs node and the packages pinned in tests/grafana/: "
            "`make grafana-schema` installs them (npm ci in tests/grafana)")
    return [node, str(TSC)]


def schema_version() -> int:
    """The dashboard ``schemaVersion`` the installed schema describes (its ``defaultDashboard``):
    a dashboard that declares an older one is migrated by Grafana on import before this schema holds."""
    node, _ = tsc()
    code = (f"import('{SCHEMA}/dashboard/x/Dashboard_types.gen')"
            ".then(m => console.log(m.defaultDashboard.schemaVersion))")
    out = subprocess.run([node, "--input-type=module", "-e", code], cwd=HERE, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return int(out.strip())


def _literal(value) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def to_typescript(dashboard: dict) -> tuple[str, list[str]]:
    """The TypeScript module that types ``dashboard``, and the problems found before compiling
    (a panel type with no schema)."""
    problems: list[str] = []
    imports = [f"import type {{ Dashboard, Panel, RowPanel }} from '{SCHEMA}/dashboard/x/Dashboard_types.gen';"]
    body: list[str] = []
    used: dict[str, str] = {}
    # Each panel is typed by its own kind: in Grafana's schema a row is a RowPanel and anything else a
    # Panel, but TypeScript would accept a broken row as a Panel (Panel's type is any string), so the
    # dashboard's panels list refers to panels checked one by one.
    top = dashboard.get("panels")
    if isinstance(top, list):
        refs = [_panel(p, f"panel_{i}", body, used, problems) for i, p in enumerate(top)]
        board = dict(dashboard, panels=PLACEHOLDER)
        literal = _literal(board).replace(json.dumps(PLACEHOLDER), "[" + ", ".join(refs) + "]")
    else:
        literal = _literal(dashboard)
    body.append(f"export const dashboard: Json<Dashboard> = {literal};")
    for kind, alias in used.items():
        imports.append(f"import type * as {alias} from '{SCHEMA}/{PANEL_SCHEMAS[kind]}';")
    return "\n".join(imports) + "\n" + PRELUDE + "\n".join(body) + "\n", problems


def _panel(p, name: str, body: list[str], used: dict[str, str], problems: list[str]) -> str:
    """Append the declarations that check panel ``p`` (a row's panels too) to ``body``; returns the
    expression that stands for it in the dashboard."""
    if not isinstance(p, dict):
        body.append(f"export const {name}: Json<Panel> = {_literal(p)};")
        return name
    if p.get("type") == "row" and isinstance(p.get("panels"), list):
        refs = [_panel(q, f"{name}_{j}", body, used, problems) for j, q in enumerate(p["panels"])]
        body.append(f"// panel {p.get('title')!r}")
        literal = _literal(dict(p, panels=PLACEHOLDER)).replace(json.dumps(PLACEHOLDER), "[" + ", ".join(refs) + "]")
        body.append(f"export const {name}: Json<RowPanel> = {literal};")
        return name
    body.append(f"// panel {p.get('title')!r}")
    body.append(f"export const {name}: Json<{'RowPanel' if p.get('type') == 'row' else 'Panel'}> = {_literal(p)};")
    kind = p.get("type")
    if kind == "row":
        return name
    if kind not in PANEL_SCHEMAS:
        problems.append(f"panel {p.get('title')!r}: no schema for panel type {kind!r} "
                        f"(known: {', '.join(sorted(PANEL_SCHEMAS))})")
        return name
    alias = used.setdefault(kind, f"P_{kind}")
    body.append(f"export const {name}_options: Loose<{alias}.Options> = {_literal(p.get('options', {}))};")
    custom = ((p.get("fieldConfig") or {}).get("defaults") or {}).get("custom")
    if custom is not None:
        field_type = f"{alias}.FieldConfig" if kind in WITH_FIELD_CONFIG else "Record<string, never>"
        body.append(f"export const {name}_custom: Loose<{field_type}> = {_literal(custom)};")
    return name


ERROR = re.compile(r"^(?P<file>[^(]+)\((?P<line>\d+),(?P<col>\d+)\): error (?P<code>TS\d+): (?P<msg>.*)$")


def check(dashboards: dict[str, dict], timeout: float = 240) -> dict[str, list[str]]:
    """Every problem Grafana's schema finds in each named dashboard ([] when it conforms), with one
    compiler run for all of them. A problem reads ``<the panel or dashboard>, at '<the JSON line>':
<the compiler's message>``."""
    command = tsc()
    result: dict[str, list[str]] = {name: [] for name in dashboards}
    with tempfile.TemporaryDirectory(dir=HERE, prefix=".check-") as tmp:
        work = Path(tmp)
        files: dict[str, tuple[str, list[str]]] = {}
        for n, (name, board) in enumerate(dashboards.items()):
            source, problems = to_typescript(board)
            result[name].extend(problems)
            path = work / f"dashboard_{n}.ts"
            path.write_text(source)
            files[path.name] = (name, source.splitlines())
        config = dict(TSCONFIG, files=sorted(files))
        (work / "tsconfig.json").write_text(json.dumps(config))
        proc = subprocess.run([*command, "-p", str(work / "tsconfig.json"), "--pretty", "false"],
                              cwd=work, capture_output=True, text=True, timeout=timeout, check=False)
        out = (proc.stdout + proc.stderr).splitlines()
        matched = False
        for i, line in enumerate(out):
            m = ERROR.match(line)
            if not m:
                continue
            matched = True
            fname = Path(m["file"]).name
            if fname not in files:
                raise RuntimeError(f"the compiler failed outside the dashboards: {line}")
            name, lines = files[fname]
            msg = m["msg"]
            for more in out[i + 1:]:  # a message continues on indented lines
                if ERROR.match(more) or not more.startswith(" "):
                    break
                msg += " " + more.strip()
            row = int(m["line"]) - 1
            where = next((lines[k][3:] for k in range(row, -1, -1) if lines[k].startswith("// panel ")), "dashboard")
            if any(lines[k].startswith("export const dashboard") for k in range(row, -1, -1)):
                where = "dashboard"
            result[name].append(f"{where}, at {lines[row].strip()[:80]!r}: {msg}")
        if proc.returncode != 0 and not matched:
            raise RuntimeError(f"tsc exited {proc.returncode} without a located error:\n" + "\n".join(out[-20:]))
    return result


if __name__ == "__main__":  # python tests/grafana/schema_check.py DASHBOARD.json ...
    import sys

    found = check({p: json.loads(Path(p).read_text()) for p in sys.argv[1:]})
    for name, problems in found.items():
        print(f"{name}: {'conforms to Grafana’s dashboard schema' if not problems else f'{len(problems)} problem(s)'}")
        for p in problems:
            print("  " + p)
    sys.exit(1 if any(found.values()) else 0)

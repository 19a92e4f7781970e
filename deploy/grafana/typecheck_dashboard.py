"""Type-check the dashboard JSON against Grafana's own generated schema types.

Grafana itself cannot be installed from the registries this project uses, so the closest check
of "would Grafana accept this dashboard" is the TypeScript types that Grafana generates from its
CUE dashboard schema and publishes as the npm package @grafana/schema. This script writes the
dashboard as a typed TypeScript object literal (so excess-property and literal-type checks
apply), plus every stat/timeseries panel's `options` and `fieldConfig.defaults.custom` against
that panel plugin's own `Options`/`FieldConfig` types, and runs `tsc --noEmit`.

    mkdir -p /tmp/tscheck && cd /tmp/tscheck && npm init -y >/dev/null &&
      npm install typescript@5 @grafana/schema@13
    python deploy/grafana/typecheck_dashboard.py /tmp/tscheck

Exit status 0 = the dashboard type-checks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parent / "dashboards" / "ocr-daemon.json"
RAW = "@grafana/schema/dist/types/raw"

PRELUDE = f"""\
import type {{ Dashboard }} from '{RAW}/dashboard/x/types.gen';
import type * as Stat from '{RAW}/composable/stat/panelcfg/x/types.gen';
import type * as TimeSeries from '{RAW}/composable/timeseries/panelcfg/x/types.gen';
import type {{ DataQuery }} from '@grafana/schema';

// Grafana's string enums, loosened to the union of their values: a JSON file holds the values.
type Loose<T> = T extends string ? `${{T}}`
  : T extends number | boolean | null | undefined ? T
  : T extends ReadonlyArray<infer U> ? Array<Loose<U>>
  : T extends object ? {{ [K in keyof T]: Loose<T[K]> }}
  : T;

// The Prometheus query model (the datasource plugin's, not part of @grafana/schema).
type PromQuery = Loose<DataQuery> & {{
  datasource: {{ type: 'prometheus'; uid: string }};
  expr: string;
  legendFormat?: string;
  range?: boolean;
  instant?: boolean;
}};
"""


def main(workdir: Path) -> int:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    stat = [p for p in panels if p["type"] == "stat"]
    series = [p for p in panels if p["type"] == "timeseries"]
    unknown = {p["type"] for p in panels} - {"stat", "timeseries"}
    if unknown:
        print(f"no type check written for panel types {sorted(unknown)}")
        return 1
    targets = [t for p in panels for t in p["targets"]]

    def dump(value: object) -> str:
        return json.dumps(value, indent=2, ensure_ascii=False)

    source = PRELUDE + "\n".join([
        f"export const dashboard: Loose<Dashboard> = {dump(dashboard)};",
        f"export const statOptions: Loose<Stat.Options>[] = {dump([p['options'] for p in stat])};",
        "export const timeSeriesOptions: Loose<TimeSeries.Options>[] = "
        f"{dump([p['options'] for p in series])};",
        "export const timeSeriesCustom: Loose<TimeSeries.FieldConfig>[] = "
        f"{dump([p['fieldConfig']['defaults']['custom'] for p in series])};",
        f"export const targets: PromQuery[] = {dump(targets)};",
        "",
    ])
    check = workdir / "dashboard_check.ts"
    check.write_text(source)
    tsc = workdir / "node_modules" / ".bin" / "tsc"
    result = subprocess.run(
        [str(tsc), "--noEmit", "--strict", "--skipLibCheck", "--target", "es2020",
         "--moduleResolution", "node", "--module", "commonjs", str(check)],
        cwd=workdir, capture_output=True, text=True, check=False,
    )
    print(result.stdout + result.stderr, end="")
    print(f"{len(panels)} panels, {len(targets)} queries: "
          f"{'type-check OK' if result.returncode == 0 else 'type errors'}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd()))

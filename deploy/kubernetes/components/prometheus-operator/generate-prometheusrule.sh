#!/bin/sh
# Writes prometheusrule.yaml beside this script from deploy/prometheus/alerts.yml:
# the same groups under a PrometheusRule's spec. With --check, writes
# nothing and exits 1 when the file is not what this would write.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
alerts="$here/../../../prometheus/alerts.yml"
out="$here/prometheusrule.yaml"
render() {
    cat <<'HEADER'
# Generated from deploy/prometheus/alerts.yml by generate-prometheusrule.sh
# beside this file: edit alerts.yml and run the script, never this file.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: nodescope
spec:
HEADER
    # from `groups:` on, every non-empty line two columns in
    sed -n '/^groups:/,$p' "$alerts" | sed 's/^\(.\)/  \1/'
}
if [ "${1:-}" = "--check" ]; then
    render | cmp -s - "$out" || { echo "$out is out of date: run $0" >&2; exit 1; }
else
    render > "$out"
fi

#!/usr/bin/env python3
"""Checks docker-compose.yml without a Docker engine: it parses, its services are the
rehearsal's (a source and a target on two different postgres majors, a writer, pgferry built
from this repository), every reference holds (depends_on, healthchecks, mounted files, the
Dockerfile's COPY sources, the entrypoint script), and the shell script parses. Run by .ci/run;
needs PyYAML."""

import os
import re
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICE_KEYS = {"image", "build", "environment", "volumes", "command", "entrypoint",
                "depends_on", "ports", "healthcheck", "restart"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
problems = []


def check(ok, what):
    if not ok:
        problems.append(what)
    return ok


def main():
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        doc = yaml.safe_load(f)
    services = doc.get("services") or {}
    check(set(services) == {"source", "target", "writer", "pgferry"},
          f"services are {sorted(services)}, expected source, target, writer, pgferry")
    majors = {}
    for name in ("source", "target"):
        image = str(services.get(name, {}).get("image", ""))
        m = re.fullmatch(r"postgres:(\d+)(\..*)?", image)
        if check(m, f"{name}: image {image!r} is not an official postgres:MAJOR image"):
            majors[name] = int(m.group(1))
    if len(majors) == 2:
        check(majors["source"] != majors["target"], "source and target use the same major")
    for name, svc in services.items():
        check(isinstance(svc, dict), f"{name}: not a mapping")
        for key in set(svc) - SERVICE_KEYS:
            problems.append(f"{name}: unexpected key {key!r}")
        check(("image" in svc) != ("build" in svc), f"{name}: needs exactly one of image, build")
        for k, v in (svc.get("environment") or {}).items():
            check(isinstance(v, (str, int)), f"{name}: environment {k} is not a string")
        for dep, spec in (svc.get("depends_on") or {}).items():
            if check(dep in services, f"{name}: depends on unknown service {dep}"):
                cond = (spec or {}).get("condition", "service_started")
                check(cond in CONDITIONS, f"{name}: unknown condition {cond}")
                if cond == "service_healthy":
                    check("healthcheck" in services[dep], f"{name}: {dep} has no healthcheck")
        for vol in svc.get("volumes") or []:
            host = str(vol).split(":")[0]
            if host.startswith("."):
                check(os.path.exists(os.path.join(ROOT, host)), f"{name}: {host} does not exist")
        for port in svc.get("ports") or []:
            check(re.fullmatch(r"\d+:\d+", str(port)), f"{name}: port {port!r} is not HOST:CONTAINER")
    pgferry = services.get("pgferry", {})
    check(pgferry.get("build") == ".", "pgferry: must be built from this repository (build: .)")
    check("9187:9187" in [str(p) for p in pgferry.get("ports") or []], "pgferry: metrics port not exposed")
    dockerfile = os.path.join(ROOT, "Dockerfile")
    if check(os.path.isfile(dockerfile), "Dockerfile is missing"):
        with open(dockerfile) as f:
            text = f.read()
        check(len(re.findall(r"^FROM ", text, re.M)) >= 2, "Dockerfile is not multi-stage")
        for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
            for src in line.split()[:-1]:
                check(src == "." or os.path.exists(os.path.join(ROOT, src)),
                      f"Dockerfile: COPY source {src} does not exist")
    script = os.path.join(ROOT, "docker/rehearse.sh")
    if check(os.access(script, os.X_OK), "docker/rehearse.sh is missing or not executable"):
        out = subprocess.run(["sh", "-n", script], capture_output=True, text=True)
        check(out.returncode == 0, f"docker/rehearse.sh does not parse: {out.stderr.strip()}")
    if problems:
        for p in problems:
            print(f"docker-compose.yml: {p}", file=sys.stderr)
        return 1
    print(f"docker-compose.yml: ok ({len(services)} services; source {majors.get('source')}, "
          f"target {majors.get('target')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Parsing and validation of application_config.yaml, with file and line in every error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labcloud.contract import HardwareSpec, OutputKind
from user_api.catalog.loader import CatalogError, load_catalog, parse_catalog
from user_api.catalog.schemas import CatalogEntrypoint, UnknownApplication

REPO_ROOT = Path(__file__).resolve().parents[3]
SOURCE = "cfg.yaml"

# Line numbers below refer to this text (line 1 is "demo:").
VALID = """\
demo:
  latest:
    wc:
      app:
        cmd: [/app/wordcount.sh]
        env: [WORDCOUNT_PATTERN]
      handler:
        image_url: labcloud/demo:latest
        files_down: {data_ids: data}
        files_up: {output: output}
      aws_resources:
        hardware: {MEMORY: 256, VCPU: 1, GPU: 0}
        timeout: 600
"""


def edited(old: str, new: str) -> str:
    assert old in VALID, old
    return VALID.replace(old, new)


def catalog_error(text: str) -> str:
    with pytest.raises(CatalogError) as caught:
        parse_catalog(text, SOURCE)
    return caught.value.message


def test_shipped_catalog_is_valid_and_runs_the_demo_image() -> None:
    catalog = load_catalog(REPO_ROOT / "application_config.yaml")
    entrypoint = catalog.get_entrypoint("demo", "latest", "wordcount")
    assert entrypoint.handler.image_url == "labcloud/demo:latest"
    assert entrypoint.app.cmd == ["/app/wordcount.sh"]
    assert entrypoint.handler.files_down.data_ids == "data"
    assert set(entrypoint.handler.files_up) == set(OutputKind)
    assert entrypoint.timeout == 600


def test_public_view_is_decode_s_nesting_without_internal_fields() -> None:
    # DECODE's web frontend reads [application][version][entrypoint].app.env; the
    # flat view LabCloud served before broke its job form.
    text = edited(
        "    wc:\n      app:",
        "    wc:\n      description: Counts words\n"
        "      container: {pids_limit: 64, user: '1000:1000', read_only_root: true}\n"
        "      app:",
    )
    view = parse_catalog(text, SOURCE).public_view().model_dump(mode="json")
    assert view == {
        "demo": {
            "latest": {
                "wc": {
                    "app": {"env": ["WORDCOUNT_PATTERN"]},
                    "handler": {
                        "files_down": {"data_ids": "data"},
                        "files_up": {"output": "output"},
                    },
                    "aws_resources": {
                        "hardware": {"MEMORY": 256, "VCPU": 1, "GPU": 0},
                        "timeout": 600,
                    },
                    "description": "Counts words",
                }
            }
        }
    }
    rendered = json.dumps(view)
    assert "labcloud/demo" not in rendered
    assert "wordcount.sh" not in rendered
    assert "pids_limit" not in rendered


def test_container_options_are_read_and_kept_in_the_snapshot() -> None:
    text = edited(
        "      aws_resources:",
        "      container:\n        pids_limit: 64\n        user: '1000:100'\n"
        "        read_only_root: true\n      aws_resources:",
    )
    entrypoint = parse_catalog(text, SOURCE).get_entrypoint("demo", "latest", "wc")
    spec = entrypoint.container.spec()
    assert (spec.pids_limit, spec.user, spec.read_only_root) == (64, "1000:100", True)
    snapshot = CatalogEntrypoint.model_validate(entrypoint.model_dump(mode="json"))
    assert snapshot.container == entrypoint.container
    # Snapshots written before the section existed still read, with the defaults.
    old = entrypoint.model_dump(mode="json")
    del old["container"], old["description"]
    assert CatalogEntrypoint.model_validate(old).container.spec().pids_limit is None


@pytest.mark.parametrize(
    ("container", "message"),
    [
        ("{pids_limit: 0}", "container/pids_limit"),
        ("{pids_limit: 2000000}", "container/pids_limit"),
        ("{pids_limit: '64'}", "container/pids_limit"),
        ("{user: root}", "container/user"),
        ("{user: '1000:'}", "container/user"),
        ("{read_only: true}", "unknown key 'read_only'"),
    ],
)
def test_invalid_container_options_are_refused_with_their_line(
    container: str, message: str
) -> None:
    text = edited("      aws_resources:", f"      container: {container}\n      aws_resources:")
    error = catalog_error(text)
    assert message in error
    assert "line 11" in error  # the line of container:


def test_entrypoint_helpers() -> None:
    entrypoint = parse_catalog(VALID, SOURCE).get_entrypoint("demo", "latest", "wc")
    assert entrypoint.allowed_env == frozenset({"WORDCOUNT_PATTERN"})
    assert entrypoint.timeout == 600
    assert entrypoint.required_hardware == HardwareSpec(cpu_cores=1, memory=256)
    assert entrypoint.gpu_count == 0


def test_entrypoint_snapshot_round_trips_through_json() -> None:
    entrypoint = parse_catalog(VALID, SOURCE).get_entrypoint("demo", "latest", "wc")
    snapshot = json.loads(json.dumps(entrypoint.model_dump(mode="json")))
    assert snapshot["aws_resources"]["hardware"] == {"MEMORY": 256, "VCPU": 1, "GPU": 0}
    assert CatalogEntrypoint.model_validate(snapshot) == entrypoint


def test_aws_resources_and_optional_fields_may_be_left_out() -> None:
    text = """\
tool:
  "1":
    run:
      app: {cmd: [run]}
      handler: {image_url: registry.example/tool:1}
"""
    entrypoint = parse_catalog(text, SOURCE).get_entrypoint("tool", "1", "run")
    assert entrypoint.allowed_env == frozenset()
    assert entrypoint.timeout is None
    assert entrypoint.required_hardware == HardwareSpec()
    assert entrypoint.gpu_count == 0
    assert entrypoint.handler.files_down.mounts() == {}
    assert entrypoint.handler.files_up == {}


@pytest.mark.parametrize(
    ("application", "version", "entrypoint", "message"),
    [
        ("nope", "latest", "wc", "unknown application 'nope'; known: demo"),
        ("demo", "2.0", "wc", "unknown version '2.0' of application 'demo'; known: latest, 1.10"),
        (
            "demo",
            "latest",
            "train",
            "unknown entrypoint 'train' of application 'demo' version 'latest'; known: wc",
        ),
    ],
)
def test_unknown_application_names_what_is_unknown(
    application: str, version: str, entrypoint: str, message: str
) -> None:
    text = VALID + "  1.10:\n    other:\n      app: {cmd: [x]}\n      handler: {image_url: i}\n"
    catalog = parse_catalog(text, SOURCE)
    with pytest.raises(UnknownApplication) as caught:
        catalog.get_entrypoint(application, version, entrypoint)
    assert caught.value.message == message
    assert caught.value.status_code == 400


def test_keys_are_read_as_written_text() -> None:
    text = VALID + "  1.10:\n    other:\n      app: {cmd: [x]}\n      handler: {image_url: i}\n"
    catalog = parse_catalog(text, SOURCE)
    assert list(catalog.root["demo"]) == ["latest", "1.10"]


def test_mount_dirs_are_normalised() -> None:
    text = edited("{data_ids: data}", "{data_ids: ./data/, config_id: conf//a}")
    files_down = parse_catalog(text, SOURCE).get_entrypoint("demo", "latest", "wc").handler
    assert files_down.files_down.mounts() == {"data_ids": "data", "config_id": "conf/a"}


def test_merge_keys_share_settings_between_versions() -> None:
    text = """\
demo:
  "1":
    wc: &wc
      app: {cmd: [run]}
      handler: {image_url: "demo:1", files_up: {output: output}}
  "2":
    wc:
      <<: *wc
      handler: {image_url: "demo:2"}
"""
    catalog = parse_catalog(text, SOURCE)
    assert catalog.get_entrypoint("demo", "2", "wc").handler.image_url == "demo:2"
    assert catalog.get_entrypoint("demo", "2", "wc").app.cmd == ["run"]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "        image_url: labcloud/demo:latest\n",
            "",
            "line 7: demo/latest/wc/handler: missing required key 'image_url'",
        ),
        (
            "image_url: labcloud/demo:latest",
            'image_url: ""',
            "line 8: demo/latest/wc/handler/image_url: String should have at least 1 character",
        ),
        (
            "{output: output}",
            "{output: output, results: out}",
            "line 10: demo/latest/wc/handler/files_up/results: "
            "Input should be 'output', 'log' or 'artifact'",
        ),
        (
            "{data_ids: data}",
            "{data_ids: data, inputs: in}",
            "line 9: demo/latest/wc/handler/files_down: unknown key 'inputs'",
        ),
        (
            "      aws_resources:\n",
            "      extra: 1\n      aws_resources:\n",
            "line 11: demo/latest/wc: unknown key 'extra'",
        ),
        (
            "{data_ids: data}",
            "{data_ids: /data}",
            "line 9: demo/latest/wc/handler/files_down/data_ids: "
            "'/data' must be relative to /files (drop the leading '/')",
        ),
        (
            "{output: output}",
            "{output: out/../../etc}",
            "line 10: demo/latest/wc/handler/files_up/output: "
            "'out/../../etc' must not contain '..'",
        ),
        (
            "{data_ids: data}",
            "{data_ids: .}",
            "line 9: demo/latest/wc/handler/files_down/data_ids: '.' names /files itself",
        ),
        (
            "timeout: 600",
            "timeout: 0",
            "line 13: demo/latest/wc/aws_resources/timeout: Input should be greater than 0",
        ),
        (
            "timeout: 600",
            "timeout: -5",
            "line 13: demo/latest/wc/aws_resources/timeout: Input should be greater than 0",
        ),
        (
            "MEMORY: 256",
            "MEMORY: 0",
            "line 12: demo/latest/wc/aws_resources/hardware/MEMORY: Input should be greater than 0",
        ),
        (
            "MEMORY: 256",
            "MEMORY: 8GB",
            "line 12: demo/latest/wc/aws_resources/hardware/MEMORY: "
            "Input should be a valid integer",
        ),
        (
            "VCPU: 1",
            "VCPU: -2",
            "line 12: demo/latest/wc/aws_resources/hardware/VCPU: Input should be greater than 0",
        ),
        (
            "GPU: 0",
            "GPU: -1",
            "line 12: demo/latest/wc/aws_resources/hardware/GPU: "
            "Input should be greater than or equal to 0",
        ),
        (
            "{MEMORY: 256, VCPU: 1, GPU: 0}",
            "{memory: 256}",
            "line 12: demo/latest/wc/aws_resources/hardware: unknown key 'memory'",
        ),
        (
            "env: [WORDCOUNT_PATTERN]",
            "env: [OK, 1BAD]",
            "line 6: demo/latest/wc/app/env/1: '1BAD' is not a valid environment variable name",
        ),
        (
            "env: [WORDCOUNT_PATTERN]",
            "env: [A-B]",
            "line 6: demo/latest/wc/app/env/0: 'A-B' is not a valid environment variable name",
        ),
        (
            "env: [WORDCOUNT_PATTERN]",
            "env: [A, B, A]",
            "line 6: demo/latest/wc/app/env: environment variables listed more than once: A",
        ),
        (
            "cmd: [/app/wordcount.sh]",
            "cmd: []",
            "line 5: demo/latest/wc/app/cmd: must not be empty",
        ),
        (
            "cmd: [/app/wordcount.sh]",
            'cmd: ["  "]',
            "line 5: demo/latest/wc/app/cmd: cmd must contain a command",
        ),
        (
            "cmd: [/app/wordcount.sh]",
            "cmd: /app/wordcount.sh",
            "line 5: demo/latest/wc/app/cmd: expected a list, found the text '/app/wordcount.sh'",
        ),
        (
            "demo:\n",
            "demo tool:\n",
            "line 1: demo tool: 'demo tool' is not a valid name",
        ),
        (
            "  latest:\n",
            "  lat/est:\n",
            "line 2: demo/lat/est: 'lat/est' is not a valid name",
        ),
    ],
)
def test_invalid_catalog_names_file_line_and_problem(old: str, new: str, expected: str) -> None:
    message = catalog_error(edited(old, new))
    assert f"{SOURCE}, {expected}" in message


def test_every_problem_is_reported() -> None:
    text = edited("timeout: 600", "timeout: 0").replace("MEMORY: 256", "MEMORY: 0")
    lines = catalog_error(text).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{SOURCE}, line 12:")
    assert lines[1].startswith(f"{SOURCE}, line 13:")


def test_empty_versions_and_entrypoints_are_refused() -> None:
    message = catalog_error("demo:\n  latest: {}\n")
    assert message == f"{SOURCE}, line 2: demo/latest: must not be empty"
    message = catalog_error("demo: {}\n")
    assert message == f"{SOURCE}, line 1: demo: must not be empty"


def test_an_explicitly_empty_catalog_is_valid_but_an_empty_file_is_not() -> None:
    assert parse_catalog("{}\n", SOURCE).root == {}
    assert "the catalog is empty" in catalog_error("# nothing yet\n")


def test_top_level_must_be_a_mapping() -> None:
    assert catalog_error("- demo\n") == (
        f"{SOURCE}, line 1: top level: expected a mapping (key: value), found a list"
    )


def test_yaml_syntax_error_names_line_and_column() -> None:
    message = catalog_error(edited("cmd: [/app/wordcount.sh]", "cmd: [/app/wordcount.sh"))
    assert message.startswith(f"{SOURCE}, line 6, column ")


def test_duplicate_keys_are_refused() -> None:
    message = catalog_error(
        edited("        timeout: 600\n", "        timeout: 600\n        timeout: 60\n")
    )
    assert message == f"{SOURCE}, line 14, column 9: duplicate key 'timeout' (first on line 13)"


def test_duplicate_versions_written_differently_are_refused() -> None:
    text = "demo:\n  1.0:\n    a: {}\n  '1.0':\n    b: {}\n"
    assert "duplicate key '1.0' (first on line 2)" in catalog_error(text)


def test_non_scalar_keys_are_refused() -> None:
    assert "a key must be a plain name" in catalog_error("? [a, b]\n: 1\n")


def test_python_tags_are_refused() -> None:
    assert "line 1" in catalog_error("demo: !!python/object:os.system {}\n")


def test_load_catalog_reports_an_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(CatalogError) as caught:
        load_catalog(missing)
    assert str(missing) in caught.value.message
    assert "cannot read" in caught.value.message


def test_load_catalog_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "application_config.yaml"
    path.write_text(edited("timeout: 600", "timeout: 0"), encoding="utf-8")
    with pytest.raises(CatalogError) as caught:
        load_catalog(path)
    assert caught.value.message.startswith(f"{path}, line 13: ")

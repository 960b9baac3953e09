"""Configuration: the shipped file, defaults, environment overrides and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxr_node.config import Settings, load_settings
from cxr_node.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "node.yaml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


def test_shipped_config_loads_and_equals_the_defaults() -> None:
    """config/node.yaml documents every key with its default value."""
    shipped = load_settings(SHIPPED, environ={})
    defaults = Settings()
    assert shipped.model_dump(exclude={"destinations"}) == defaults.model_dump(exclude={"destinations"})
    assert [d.name for d in shipped.destinations] == ["pacs"]


def test_shipped_config_lists_every_key() -> None:
    """Every settings key appears in the shipped file, so the file is complete documentation."""
    text = SHIPPED.read_text()

    def keys(model: type, prefix: str = "") -> list[str]:
        found = []
        for name, field in model.model_fields.items():
            if name == "source":
                continue
            found.append(name)
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields") and name != "destinations":
                found.extend(keys(sub))
        return found

    missing = [key for key in keys(Settings) if f"{key}:" not in text]
    assert missing == []


def test_contract_keys_exist() -> None:
    """The keys of DESIGN.md §5 keep their names and defaults."""
    s = Settings()
    assert (s.node.ae_title, s.node.host, s.node.port, s.node.allowed_calling_aets) == (
        "CXR_NODE",
        "0.0.0.0",
        11112,
        [],
    )
    assert s.storage.root == Path("/var/lib/cxr-node")
    assert s.models.manifest == Path("models/demo/manifest.yaml")
    assert s.compute.device == "auto"


def test_environment_overrides_file(tmp_path: Path) -> None:
    """CXR_NODE_<SECTION>__<KEY> wins over the file, values parsed as YAML."""
    path = _write(tmp_path, "node: {port: 104}\n")
    env = {"CXR_NODE_NODE__PORT": "11113", "CXR_NODE_NODE__ALLOWED_CALLING_AETS": "[PACS, MOD1]"}
    s = load_settings(path, environ=env)
    assert s.node.port == 11113
    assert s.node.allowed_calling_aets == ["PACS", "MOD1"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("node: {port: abc}\n", "node.port: Input should be a valid integer"),
        ("node: {prot: 1}\n", "node.prot: unknown key"),
        ("nodes: {}\n", "nodes: unknown key"),
        ("node: {ae_title: THIS_TITLE_IS_TOO_LONG}\n", "node.ae_title"),
        ("node: {port: 70000}\n", "node.port"),
        ("node: {allowed_ips: [not-an-ip]}\n", "node.allowed_ips"),
        ("node: {tls: {enabled: true}}\n", "tls.enabled needs tls.cert_file"),
        ("compute: {device: gpu}\n", "compute.device"),
        ("destinations: [{name: p, ae_title: P, host: h}]\n", "destinations.0.port"),
        ("node: [\n", "not valid YAML at line 2"),
        ("- a\n- b\n", "the top level must be a mapping"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    """A wrong key, type or value stops loading with one line naming the file and the key."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    """A bad override names the environment variable, not only the file."""
    path = _write(tmp_path, "")
    with pytest.raises(ConfigError, match=r"environment variable CXR_NODE_NODE__PORT"):
        load_settings(path, environ={"CXR_NODE_NODE__PORT": "x"})


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    """A missing file says how to point at another one."""
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "absent.yaml", environ={})


def test_settings_are_frozen() -> None:
    """Settings cannot be changed after loading; with_overrides returns a validated copy."""
    s = Settings()
    with pytest.raises(Exception, match="frozen"):
        s.node.port = 1  # type: ignore[misc]
    assert s.with_overrides({"node.port": 1}).node.port == 1
    with pytest.raises(ConfigError, match=r"node.port"):
        s.with_overrides({"node.port": -1})

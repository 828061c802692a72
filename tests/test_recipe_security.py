"""A recipe runs no code outside collapse_guard unless it says `trust_recipe_code: true`, and an error never
copies a file it was pointed at (issue 23 section 5)."""

import subprocess
import sys
from pathlib import Path

import pytest

from collapse_guard.config import ConfigError, check_config, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"model": {"name_or_path": "tiny"}, "data": {"real": "tiny:human", "heldout": "tiny:heldout"}}


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A module on sys.path that leaves a file behind when it is imported (its import-time code ran)."""
    marker = tmp_path / "imported"
    (tmp_path / "planted_module.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("planted_module", None)
    yield marker
    sys.modules.pop("planted_module", None)


@pytest.mark.parametrize(
    ("section", "key"),
    [({"selectors": [{"class": "planted_module.Thing"}]}, "selectors[0].class"),
     ({"callbacks": [{"class": "planted_module.Thing"}]}, "callbacks[0].class"),
     ({"mixing": {"synthetic_filter": {"class": "planted_module.Thing"}}}, "mixing.synthetic_filter.class")],
)
def test_a_class_outside_the_package_is_refused_before_its_module_runs(planted, section, key):
    with pytest.raises(ConfigError) as err:
        check_config(config_from_dict({**OFFLINE, **section}))
    message = str(err.value)
    assert message.startswith(f"{key}='planted_module.Thing'") and "trust_recipe_code: true" in message
    assert "\n" not in message
    assert not planted.exists(), "the module was imported: its code ran"


def test_trust_recipe_code_allows_it(planted):
    config = config_from_dict({**OFFLINE, "trust_recipe_code": True,
                               "selectors": [{"class": "planted_module.Thing"}]})
    with pytest.raises(ConfigError, match="is not a Selector subclass"):  # imported now, then checked
        check_config(config)
    assert planted.exists()


def test_the_package_own_classes_need_no_trust():
    check_config(config_from_dict({
        **OFFLINE, "selectors": [{"class": "collapse_guard.selection.DedupSelector"}],
        "mixing": {"synthetic_filter": {"class": "collapse_guard.selection.PrivacyFilter"}}}))


def test_the_cli_does_not_run_this_s(tmp_path):
    """The issue's reproduction: `class: this.s` printed the Zen of Python."""
    recipe = tmp_path / "zen.yaml"
    recipe.write_text(f"extends: {REPO / 'recipes' / 'tiny_loop.yaml'}\nselectors: [{{class: this.s}}]\n")
    done = subprocess.run([sys.executable, "-m", "collapse_guard.cli", "run", str(recipe),
                           f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Zen of Python" not in done.stdout + done.stderr
    assert done.stderr.strip().count("\n") == 0 and "trust_recipe_code" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["lines", "passwd"])
def test_extends_of_a_large_file_quotes_at_most_a_line(tmp_path, target):
    if target == "passwd":
        parent = Path("/etc/passwd")
        if not parent.is_file():  # pragma: no cover
            pytest.skip("no /etc/passwd")
    else:
        parent = tmp_path / "secrets.txt"
        parent.write_text("".join(f"user{i}:x:{i}:{i}:secret number {i}:/home/u{i}:/bin/sh\n"
                                  for i in range(200)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"extends: {parent}\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    message = str(err.value)
    lines = parent.read_text().splitlines()
    assert "\n" not in message and len(message) < 400, message
    # at most (part of) the first line of the file
    assert not any(line[:20] in message for line in lines[1:] if len(line) >= 20), message

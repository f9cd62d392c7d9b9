"""The stage registry: lookups, clear errors for missing or broken plug-ins, and `funnel stages`."""

from __future__ import annotations

import json
import re
import textwrap

import pyarrow as pa
import pytest
from click.testing import CliRunner

from pipeline import ANY, ConfigError, Stage, StageTags, get_stage_class, register_stage
from pipeline import registry
from pipeline.cli import main
from pipeline.registry import describe_stage, format_stage_details, format_stage_list, list_stages, parameter_docs


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def local_registry(monkeypatch):
    """In-process registrations made by a test are forgotten after it."""
    monkeypatch.setattr(registry, "_LOCAL", dict(registry._LOCAL))


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """Make fake installed distributions: ``make(name, {key: "module:Class"}, modules={...}, direct_url=...)``."""

    def make(name: str, entry_points: dict[str, str], *, modules: dict[str, str] | None = None,
             direct_url: dict | None = None):
        root = tmp_path / name
        info = root / f"{name.replace('-', '_')}-1.2.3.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
        (info / "entry_points.txt").write_text(
            "[funnel.stages]\n" + "".join(f"{key} = {target}\n" for key, target in entry_points.items()))
        if direct_url is not None:
            (info / "direct_url.json").write_text(json.dumps(direct_url))
        for module, source in (modules or {}).items():
            (root / f"{module}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(root))
        return root

    return make


STAGE_SOURCE = """
    import pyarrow as pa
    from pipeline import Stage

    class Ghost(Stage):
        name = "{name}"

        def transform(self, table: pa.Table) -> pa.Table:
            return table
"""


# -- lookups ---------------------------------------------------------------------------------------


def test_built_in_stages_come_with_their_package_and_version():
    infos = {info.key: info for info in list_stages()}
    assert infos["filter.rules"].package == "funnel-rank"
    assert infos["filter.rules"].version
    assert get_stage_class("filter.rules").__name__ == "RuleFilter"


def test_unknown_type_suggests_close_names_and_lists_known_ones():
    with pytest.raises(ConfigError) as err:
        get_stage_class("filter.rulez")
    msg = str(err.value)
    assert msg.startswith("unknown stage type 'filter.rulez'; known types: ") and "recall.faiss" in msg
    assert "Did you mean 'filter.rules'?" in msg and "install the package that provides it" in msg and "\n" not in msg


def test_local_registration_wins_and_is_listed(local_registry):
    @register_stage
    class Local(Stage):
        name = "filter.local_test"

        def transform(self, table):
            return table

    assert get_stage_class("filter.local_test") is Local
    info = {i.key: i for i in list_stages()}["filter.local_test"]
    assert info.package is None and info.target.endswith(":test_local_registration_wins_and_is_listed.<locals>.Local")


# -- broken or missing plug-ins ----------------------------------------------------------------------


def test_plug_in_whose_module_is_gone_names_the_package_and_the_fix(plugin_dir):
    plugin_dir("funnel-ghost", {"filter.ghost": "ghost_gone_mod:Ghost"})
    with pytest.raises(ConfigError) as err:
        get_stage_class("filter.ghost")
    assert str(err.value) == (
        "stage type 'filter.ghost' is registered by package funnel-ghost 1.2.3 (ghost_gone_mod:Ghost) but cannot be "
        "imported (ModuleNotFoundError: No module named 'ghost_gone_mod'); try `pip install --force-reinstall funnel-ghost`")


def test_editable_plug_in_is_reinstalled_from_its_folder(plugin_dir):
    plugin_dir("funnel-ghost-edit", {"filter.ghost_edit": "ghost_edit_gone:Ghost"},
               direct_url={"url": "file:///src/my%20plugin", "dir_info": {"editable": True}})
    with pytest.raises(ConfigError, match=r"try `pip install -e /src/my plugin`$"):
        get_stage_class("filter.ghost_edit")


def test_plug_in_missing_a_dependency_says_which(plugin_dir):
    plugin_dir("funnel-needy", {"filter.needy": "needy_mod:Ghost"},
               modules={"needy_mod": "import not_a_real_dependency_xyz\n"})
    with pytest.raises(ConfigError) as err:
        get_stage_class("filter.needy")
    msg = str(err.value)
    assert "registered by package funnel-needy 1.2.3" in msg
    assert "funnel-needy needs the module 'not_a_real_dependency_xyz', which is not installed" in msg


@pytest.mark.parametrize("error", ["RuntimeError('boom at import')", "AttributeError('boom at import')"])
def test_plug_in_failing_on_import_is_reported_as_its_bug(plugin_dir, error):
    module = f"crashy_{error[:5].lower()}_mod"
    plugin_dir(f"funnel-{module.replace('_', '-')}", {"filter.crashy": f"{module}:Ghost"},
               modules={module: f"raise {error}\n"})
    with pytest.raises(ConfigError, match=rf"\({error[:error.index('(')]}: boom at import\); importing it raised an "
                                          rf"error inside funnel-{module.replace('_', '-')} \(run with --debug"):
        get_stage_class("filter.crashy")


@pytest.mark.parametrize("module, source, target, expected", [
    ("wrong_attr_mod", STAGE_SOURCE.format(name="filter.wrong"), "Missing", "its module does not define Missing (module 'wrong_attr_mod' has no attribute 'Missing'); the installed funnel-wrong-attr-mod may be out of date: reinstall it (`pip install --force-reinstall funnel-wrong-attr-mod`)"),
    ("wrong_kind_mod", "THING = 3\n", "THING", "which is a int, not a subclass of pipeline.Stage"),
    ("wrong_name_mod", STAGE_SOURCE.format(name="filter.other"), "Ghost",
     "whose name is 'filter.other'; the entry point key and the class' name must be equal"),
], ids=["missing-class", "not-a-stage", "name-mismatch"])
def test_plug_in_pointing_at_the_wrong_thing(plugin_dir, module, source, target, expected):
    plugin_dir(f"funnel-{module.replace('_', '-')}", {"filter.wrong": f"{module}:{target}"}, modules={module: source})
    with pytest.raises(ConfigError, match="stage type 'filter.wrong'") as err:
        get_stage_class("filter.wrong")
    assert expected in str(err.value)


def test_two_packages_claiming_one_key_are_both_named(plugin_dir):
    plugin_dir("funnel-one", {"filter.twice": "one_mod:Ghost"})
    plugin_dir("funnel-two", {"filter.twice": "two_mod:Ghost"})
    with pytest.raises(ConfigError, match="registered by more than one package: .*funnel-(one|two) 1.2.3.*funnel-(one|two) 1.2.3"):
        get_stage_class("filter.twice")


def test_config_naming_a_broken_plug_in_fails_with_one_line(plugin_dir, tmp_path):
    plugin_dir("funnel-ghost-cfg", {"filter.ghost_cfg": "ghost_cfg_gone:Ghost"})
    config = tmp_path / "p.toml"
    config.write_text('[[stages]]\ntype = "filter.ghost_cfg"\n')
    result = invoke("config", "check", config)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "funnel: error: stage type 'filter.ghost_cfg' is registered by package funnel-ghost-cfg 1.2.3 "
        "(ghost_cfg_gone:Ghost) but cannot be imported (ModuleNotFoundError: No module named 'ghost_cfg_gone'); "
        "try `pip install --force-reinstall funnel-ghost-cfg`"]


def test_stages_list_survives_a_broken_plug_in(plugin_dir):
    plugin_dir("funnel-ghost-list", {"filter.ghost_list": "ghost_list_gone:Ghost"})
    result = invoke("stages", "list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("filter.ghost_list "))
    assert "funnel-ghost-list" in lines[row] and "1.2.3" in lines[row]
    assert lines[row + 1].strip().startswith("! stage type 'filter.ghost_list' is registered by package funnel-ghost-list")
    assert any(line.startswith("filter.rules ") for line in lines)


# -- descriptions ------------------------------------------------------------------------------------


class Documented(Stage):
    """Keep rows whose score beats a threshold.

    A longer paragraph about the stage.

    Args:
        threshold: minimum score; a number >= 0.
        column: the column compared,
            any numeric column.
        mode: ``"strict"`` or ``"loose"``.

    Returns nothing special.
    """

    name = "filter.documented_test"
    input_schema = pa.schema([pa.field("query_id", ANY), pa.field("score", pa.float32())])
    tags = StageTags(level="candidate")

    def __init__(self, threshold: float, column: str = "score", mode="strict", device: str = "cpu"):
        self.threshold = threshold
        self.column = column
        self.mode = mode
        self.device = device

    def transform(self, table):
        return table


def test_parameter_docs_come_from_the_signature_and_the_args_section():
    docs = {p["name"]: p for p in parameter_docs(Documented)}
    assert list(docs) == ["threshold", "column", "mode", "device"]
    assert docs["threshold"] == {"name": "threshold", "type": "float", "required": True, "default": None,
                                 "doc": "minimum score; a number >= 0."}
    assert docs["column"]["doc"] == "the column compared, any numeric column."
    assert docs["column"]["default"] == "score" and not docs["column"]["required"]
    assert docs["mode"]["type"] == "str"
    assert docs["device"]["doc"] == ""


def test_stages_show_prints_parameters_columns_and_tags(local_registry):
    register_stage(Documented)
    text = format_stage_details("filter.documented_test")
    assert "package     (registered in process)" in text
    assert "Keep rows whose score beats a threshold." in text and "Returns nothing special." in text
    assert "Args:" not in text
    assert "threshold  float  required" in text and "minimum score; a number >= 0." in text
    assert "column     str    default 'score'" in text
    assert "  score: float" in text and "level=candidate" in text
    described = describe_stage("filter.documented_test")
    assert described["input"] == [{"name": "query_id", "type": "any"}, {"name": "score", "type": "float"}]
    assert not described["input_depends_on_params"]


def test_stages_show_cli_for_a_built_in_and_for_an_unknown_key():
    result = invoke("stages", "show", "display.topn")
    assert result.exit_code == 0, result.output
    assert "package     funnel-rank" in result.output
    assert re.search(r"^  n +int +default 10$", result.output, flags=re.M), result.output
    assert "top-N       parameter 'n'" in result.output
    result = invoke("stages", "show", "display.topm")
    assert result.exit_code == 2 and "Did you mean 'display.topn'" in result.output


def test_stages_list_and_show_as_json():
    rows = json.loads(invoke("stages", "list", "--json").output)
    by_key = {r["key"]: r for r in rows}
    assert by_key["recall.faiss"]["devices"] == ["cpu", "cuda"] and by_key["recall.faiss"]["package"] == "funnel-rank"
    assert "query_embedding" in by_key["recall.faiss"]["input"]
    shown = json.loads(invoke("stages", "show", "filter.rules", "--json").output)
    assert [p["name"] for p in shown["parameters"]] == ["rules", "dedupe_by", "group_by", "order_by", "device"]
    assert shown["parameters"][2]["doc"].startswith("column whose value delimits a group")


def test_stages_list_table_has_every_column():
    out = format_stage_list()
    head = out.splitlines()[0].split()
    assert head[:5] == ["key", "class", "package", "version", "devices"]
    assert "input" in head and "output" in head


def test_stages_commands_have_help():
    for cmd in (["stages", "list"], ["stages", "show"]):
        result = invoke(*cmd, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output and "--json" in result.output

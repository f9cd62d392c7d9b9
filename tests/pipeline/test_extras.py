"""Optional dependencies are checked up front, with the extra and the install command named."""

from __future__ import annotations

import pytest

from pipeline.errors import MISSING_EXTRA, DependencyError, FunnelError
from pipeline.extras import install_command, missing_modules, require_extra


def test_missing_modules_finds_absent_and_dotted_names_without_importing_them():
    assert missing_modules(["json", "pyarrow.parquet"]) == []
    assert missing_modules(["json", "funnel_no_such_module", "funnel_no_such_module.sub"]) == [
        "funnel_no_such_module", "funnel_no_such_module.sub"]


def test_require_extra_names_what_needs_it_the_extra_and_the_install_command():
    require_extra("bench", ["json"], needed_by="funnel bench")  # present: nothing happens
    with pytest.raises(DependencyError) as err:
        require_extra("train", ["json", "funnel_no_such_module"], needed_by="funnel train encoder")
    assert isinstance(err.value, FunnelError)
    assert str(err.value) == MISSING_EXTRA.format(needed_by="funnel train encoder", modules="funnel_no_such_module",
                                                  verb="is", extra="train", command=install_command("train"))


def test_the_install_command_follows_how_funnel_was_installed():
    command = install_command("ray")
    # this checkout is installed editable, so the command names its folder (or "." from inside it)
    assert command.startswith('pip install -e "') and command.endswith('[ray]"'), command


def test_a_plug_in_names_its_own_distribution():
    with pytest.raises(DependencyError, match=r"extra 'fast'\): pip install \"my-funnel-stages\[fast\]\"$"):
        require_extra("fast", ["funnel_no_such_module"], needed_by="stage 'filter.fast'",
                      distribution="my-funnel-stages")

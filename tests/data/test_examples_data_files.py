"""The `Example:` blocks of the data-from-files modules run and give what they show."""
import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["fastcnf.data.table", "fastcnf.data.standardize", "fastcnf.data.image_folder",
                                    "fastcnf.evaluation.scoring", "fastcnf.training.trained_run"])
def test_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0

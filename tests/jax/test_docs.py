"""The runnable examples in the public docstrings stay correct."""

import doctest

import pytest

import losia_jax.alias
import losia_jax.compose
import losia_jax.pro
import losia_jax.selection
import losia_jax.transform


@pytest.mark.parametrize("module", [losia_jax.selection, losia_jax.alias, losia_jax.compose,
                                    losia_jax.pro, losia_jax.transform])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0

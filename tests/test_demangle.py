"""C++ names in profiles are demangled (libstdc++'s __cxa_demangle)."""
from __future__ import annotations

import pytest

from collector.symbolize.demangle import available, demangle


@pytest.mark.skipif(not available(), reason="needs libstdc++")
def test_itanium_names():
    assert demangle("_ZN4node5StartEiPPc") == "node::Start(int, char**)"
    assert demangle("_ZNSt6vectorIiSaIiEE9push_backERKi") == "std::vector<int, std::allocator<int> >::push_back(int const&)"


def test_c_names_and_garbage_pass_through():
    assert demangle("main") == "main"
    assert demangle("_Znot_a_real_mangling!!") == "_Znot_a_real_mangling!!"

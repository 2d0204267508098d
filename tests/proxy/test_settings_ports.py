"""The sidecar's port variables accept ASCII digits only, and say which variable is wrong."""

from __future__ import annotations

import pytest

from sidekey.core import contract
from sidekey.proxy import settings

ENV = {contract.ENV_POD_NAME: "p", contract.ENV_POD_NAMESPACE: "n", contract.ENV_POD_UID: "u",
       contract.ENV_SERVICE_ACCOUNT: "sa"}


#: Superscript, mixed, Arabic-Indic and fullwidth digits: isdigit() accepts them all.
NOT_ASCII_DIGITS = ["\u00b2", "8\u00b2", "\u0663\u0660\u0660\u0660", "\uff18\uff10\uff18\uff10"]

@pytest.mark.parametrize("name", [contract.ENV_PROXY_PORT, contract.ENV_HEALTH_PORT])
@pytest.mark.parametrize("value", NOT_ASCII_DIGITS)
def test_a_port_of_non_ascii_digits_is_a_settings_error_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(settings.SettingsError, match=name):
        settings.Settings.from_env({**ENV, name: value})

"""MAIL FROM and RCPT TO parameters (common/smtp/params.py), fed text, no socket.

What the listener offers decides what is taken; the sessions over real
sockets are tested in tests/component and tests/adversarial, these pin each
rule and each refusal's reply.
"""

from __future__ import annotations

import pytest

from common import reply as R
from common.reply import Reply, SMTPError
from common.smtp import params


def mail(
    *given: str, utf8: bool = True, dsn: bool = True, requiretls: bool = True, binarymime: bool = True,
    keywords: tuple[str, ...] = ("XTRACE",),
) -> dict[str, str]:
    """MAIL FROM's parameters `given`, on a listener offering everything unless told (1000 octets at most)."""
    return params.mail_params(
        list(given), max_size=1000, utf8=utf8, dsn=dsn, requiretls=requiretls, binarymime=binarymime, keywords=keywords
    )


def test_mail_parameters_taken_when_offered() -> None:
    assert mail("SIZE=999", "body=8bitmime", "SMTPUTF8", "RET=HDRS", "ENVID=a+2Bb", "REQUIRETLS", "XTRACE=t1") == {
        "SIZE": "999", "BODY": "8bitmime", "SMTPUTF8": "", "RET": "HDRS", "ENVID": "a+b", "REQUIRETLS": "",
        "XTRACE": "t1",
    }  # fmt: skip
    assert mail("BODY=BINARYMIME") == {"BODY": "BINARYMIME"}


def test_mail_parameters_refused_as_before() -> None:
    def reply(*given: str, **offers: bool) -> Reply:
        with pytest.raises(SMTPError) as err:
            mail(*given, **offers)
        return err.value.reply

    assert reply("SIZE=1", "size=2") == R.PARAM_SYNTAX.with_text("SIZE given twice")
    assert reply("SIZE=1001") == R.MESSAGE_TOO_BIG
    assert reply("BODY=BINARYMIME", binarymime=False) == R.PARAM_SYNTAX.with_text("BODY must be 7BIT or 8BITMIME")
    assert reply("SMTPUTF8", utf8=False) == R.PARAM_SYNTAX.with_text("SMTPUTF8 takes no value")
    assert reply("REQUIRETLS=yes") == R.PARAM_SYNTAX.with_text("REQUIRETLS takes no value")
    # What is not offered is not recognised: DSN's RET, REQUIRETLS in clear, a stranger.
    assert reply("RET=FULL", dsn=False) == R.PARAM_NOT_RECOGNIZED.with_text("Unsupported parameter RET")
    assert reply("REQUIRETLS", requiretls=False) == R.PARAM_NOT_RECOGNIZED.with_text("Unsupported parameter REQUIRETLS")
    with pytest.raises(SMTPError) as err:
        mail("XTRACE=t1", keywords=())
    assert err.value.reply == R.PARAM_NOT_RECOGNIZED.with_text("Unsupported parameter XTRACE")


def test_rcpt_parameters_only_with_dsn() -> None:
    assert params.rcpt_params(["NOTIFY=success,delay", "ORCPT=rfc822;a@b.example"], dsn=True) == {
        "NOTIFY": "SUCCESS,DELAY", "ORCPT": "rfc822;a@b.example",
    }
    for given, dsn, want in [
        (["NOTIFY=NEVER"], False, R.PARAM_NOT_RECOGNIZED.with_text("Unsupported parameter NOTIFY")),
        (["FOO=1"], True, R.PARAM_NOT_RECOGNIZED.with_text("Unsupported parameter FOO")),
        (["NOTIFY=NEVER", "notify=NEVER"], True, R.PARAM_SYNTAX.with_text("NOTIFY given twice")),
    ]:
        with pytest.raises(SMTPError) as err:
            params.rcpt_params(given, dsn=dsn)
        assert err.value.reply == want

"""The types of the plugin API: what each hook receives and what it may return.

A hook is found by name (``hook_rcpt``), so :class:`~qpconn.hooks.plugin.Plugin` cannot
define the hooks itself: a base-class method would make every plugin "implement" every
hook. :class:`HookSignatures` lists them for type checkers only -- ``Plugin`` derives from
it under ``TYPE_CHECKING`` and from ``object`` at run time -- so an editor completes
``def hook_rcpt(self, transaction, recipient, params)`` with its types, and mypy or pyright
report a hook whose arguments do not match what the server passes::

    from qpconn import DECLINED, DENY, Address, Plugin, Transaction
    from qpconn.hooks.types import HookResult, Params

    class NoBounces(Plugin):
        def hook_mail(
            self, transaction: Transaction, sender: Address, params: Params
        ) -> HookResult:
            return (DENY, "5.7.1 no bounces here") if sender.is_null else DECLINED

A hook may return its result directly, as a Deferred, or be ``async def``: all three fit
:data:`HookResult`.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeAlias

from qpconn.hooks.results import Result

if TYPE_CHECKING:
    from qpconn.mail.address import Address
    from qpconn.mail.transaction import Transaction

__all__ = ["HookOutcomeValue", "HookResult", "HookSignatures", "Params"]

#: what a hook decides: a Result, a Result with the reply text, or None for DECLINED
HookOutcomeValue: TypeAlias = "Result | tuple[Result, str] | tuple[Result, str | None] | None"
#: what a hook returns: the decision itself, or an awaitable of it (Deferred, coroutine)
HookResult: TypeAlias = "HookOutcomeValue | Awaitable[HookOutcomeValue]"
#: MAIL and RCPT parameters: ``{"SIZE": "1000", "SMTPUTF8": None}``
Params: TypeAlias = "dict[str, str | None]"


class HookSignatures:
    """Every hook with the arguments the server passes (docs/plugins.md#the-hooks).

    Seen only by type checkers (as a base of Plugin); the bodies are never run.
    """

    def hook_pre_connection(self, transaction: Transaction) -> HookResult:
        return None

    def hook_connect(self, transaction: Transaction) -> HookResult:
        return None

    def hook_helo(self, transaction: Transaction, host: str) -> HookResult:
        return None

    def hook_ehlo(self, transaction: Transaction, host: str) -> HookResult:
        return None

    def hook_auth(
        self,
        transaction: Transaction,
        mechanism: str,
        user: str,
        password: str | None,
        response: str | None,
        ticket: str | None,
    ) -> HookResult:
        return None

    # each mechanism's own hook takes what ``auth`` takes
    hook_auth_plain = hook_auth_login = hook_auth_cram_md5 = hook_auth

    def hook_mail_pre(self, transaction: Transaction, arg: str) -> HookResult:
        return None

    def hook_mail(self, transaction: Transaction, sender: Address, params: Params) -> HookResult:
        return None

    def hook_rcpt_pre(self, transaction: Transaction, arg: str) -> HookResult:
        return None

    def hook_rcpt(
        self, transaction: Transaction, recipient: Address, params: Params
    ) -> HookResult:
        return None

    def hook_data(self, transaction: Transaction) -> HookResult:
        return None

    def hook_data_headers_end(self, transaction: Transaction) -> HookResult:
        return None

    def hook_data_post(self, transaction: Transaction) -> HookResult:
        return None

    def hook_queue_pre(self, transaction: Transaction) -> HookResult:
        return None

    def hook_queue(self, transaction: Transaction) -> HookResult:
        return None

    def hook_queue_post(self, transaction: Transaction) -> HookResult:
        return None

    def hook_reset_transaction(self, transaction: Transaction) -> HookResult:
        return None

    def hook_disconnect(self, transaction: Transaction) -> HookResult:
        return None

    def hook_post_connection(self, transaction: Transaction) -> HookResult:
        return None

    def hook_unrecognized_command(
        self, transaction: Transaction, verb: str, arg: str
    ) -> HookResult:
        return None

    def hook_vrfy(self, transaction: Transaction, arg: str) -> HookResult:
        return None

    def hook_noop(self, transaction: Transaction, arg: str) -> HookResult:
        return None

    def hook_help(self, transaction: Transaction, arg: str) -> HookResult:
        return None

    def hook_quit(self, transaction: Transaction) -> HookResult:
        return None

    def hook_deny(
        self, transaction: Transaction, plugin: str, hook: str, result: Result, message: str | None
    ) -> HookResult:
        return None

    def hook_ok(
        self, transaction: Transaction, plugin: str, hook: str, result: Result, message: str | None
    ) -> HookResult:
        return None

    def hook_received_line(self, transaction: Transaction) -> HookResult:
        return None

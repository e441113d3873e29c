"""Dovecot's part in users' filters: ManageSieve, and learning spam from IMAP moves (Pigeonhole).

Both come from Debian's dovecot-sieve and dovecot-managesieved (Pigeonhole);
cli/dovecot.py adds what this module writes to the dovecot.conf it generates.

ManageSieve (RFC 5804) listens on `[imap] sieve` (the 4190 role), with the same
users and passwords as IMAP, TLS by STARTTLS.  A user's scripts are kept where
the MDA reads them, one place for both (common/users.py, `sieve_dir`):
MAIL_ROOT/.sieve/<mailbox>/scripts/NAME.sieve, and `active.sieve`, the link
Pigeonhole points at the active script, beside that folder.  Pigeonhole is
told which extensions our interpreter runs (mda/sieve.py, CAPABILITIES), so it
refuses to store a script that the MDA could not run, and its size limit is
`[mda] sieve_max_size`, the MDA's.

Learning (with a supervised rspamd): Dovecot's IMAPSieve runs a small global
script when a message is copied or moved into Junk (learn spam) or out of it
to anything but Trash (learn ham); the script pipes the message
(vnd.dovecot.pipe, the sieve_extprograms plugin) to `rspamc learn_spam` /
`learn_ham`, which talks to rspamd's controller over its Unix socket (the
Mailroom user's alone; cli/rspamd.py), so no password is on a command line.
"""

from __future__ import annotations

import os
from pathlib import Path

from cli import rspamd
from common.config import Config, parse_hostport
from common.users import sieve_dir

PIGEONHOLE_PLUGIN = "/usr/lib/dovecot/modules/lib90_sieve_plugin.so"
MANAGESIEVE = "/usr/lib/dovecot/managesieve"
IMAPSIEVE_PLUGIN = "/usr/lib/dovecot/modules/lib95_imap_sieve_plugin.so"
EXTPROGRAMS_PLUGIN = "/usr/lib/dovecot/modules/sieve/lib90_sieve_extprograms_plugin.so"
# mda/sieve.py CAPABILITIES, as Pigeonhole names them (less ereject, which this Pigeonhole lacks:
# the MDA runs it in a script stored by other means).
EXTENSIONS = "fileinto envelope reject vacation imap4flags body variables copy mailbox comparator-i;octet"


def managesieve_on(cfg: Config) -> bool:
    return bool(cfg.imap.sieve) and os.path.exists(MANAGESIEVE) and os.path.exists(PIGEONHOLE_PLUGIN)


def learning_on(cfg: Config) -> bool:
    """Do IMAP moves into and out of Junk teach the supervised rspamd?  Only where it runs:
    it goes with the `mta` role, and learning reaches it over a Unix socket of this host."""
    return (cfg.filter.supervised and "mta" in cfg.mailroom.roles and rspamd.why_not(cfg) is None
            and os.path.exists(IMAPSIEVE_PLUGIN) and os.path.exists(EXTPROGRAMS_PLUGIN))


def why_not(cfg: Config) -> str | None:
    """One line when ManageSieve is off although asked for, else None."""
    if cfg.imap.sieve and not managesieve_on(cfg):
        return "ManageSieve is off: install dovecot-managesieved and dovecot-sieve"
    return None


def user_fields(cfg: Config, mailbox: str) -> list[str]:
    """The users file's fields for one user: where their Sieve scripts are."""
    folder = sieve_dir(cfg.mail_root.resolve(), mailbox)
    # The Sieve folder is also the user's home for Dovecot: Pigeonhole keeps its
    # duplicate-suppression database there.
    return [f"userdb_sieve=file:{folder}/scripts;active={folder}/active.sieve", f"userdb_home={folder}"]


def protocols(cfg: Config) -> str:
    return " sieve" if managesieve_on(cfg) else ""


def imap_plugins(cfg: Config) -> str:
    return " imap_sieve" if learning_on(cfg) else ""


def render(cfg: Config, no_chroot: str) -> str:
    """The dovecot.conf lines for ManageSieve and learning (written by cli/dovecot.py)."""
    text = ""
    if managesieve_on(cfg):
        host, port = parse_hostport(cfg.imap.sieve)
        text += f"""
# ManageSieve (RFC 5804) for users' filters: scripts where the MDA runs them.
service managesieve-login {{
  inet_listener sieve {{
    address = {host}
    port = {port}
  }}
{no_chroot}}}
protocol sieve {{
  managesieve_max_line_length = 65536
}}
"""
    plugin = [
        f"  sieve_extensions = {EXTENSIONS}",
        f"  sieve_max_script_size = {cfg.mda.sieve_max_size}",
        "  sieve_max_redirects = 4",
        "  sieve_max_actions = 32",
    ]
    if learning_on(cfg):
        bin_dir = write_learn_scripts(cfg)
        plugin += [
            "  sieve_plugins = sieve_imapsieve sieve_extprograms",
            "  sieve_global_extensions = +vnd.dovecot.pipe +vnd.dovecot.environment",
            f"  sieve_pipe_bin_dir = {bin_dir}",
            "  imapsieve_mailbox1_name = Junk",
            "  imapsieve_mailbox1_causes = COPY",
            f"  imapsieve_mailbox1_before = file:{bin_dir}/report-spam.sieve",
            "  imapsieve_mailbox2_name = *",
            "  imapsieve_mailbox2_from = Junk",
            "  imapsieve_mailbox2_causes = COPY",
            f"  imapsieve_mailbox2_before = file:{bin_dir}/report-ham.sieve",
        ]
    text += "\nplugin {\n" + "\n".join(plugin) + "\n}\n"
    return text


def learn_dir(cfg: Config) -> Path:
    return cfg.run_dir.resolve() / "dovecot" / "sieve-learn"


def write_learn_scripts(cfg: Config) -> Path:
    """The two IMAPSieve scripts and the two programs they pipe to."""
    d = learn_dir(cfg)
    # Only the Mailroom user's Dovecot runs them (cli/dovecot.py hands them over).
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    d.chmod(0o700)
    rspamc = rspamd.find(rspamd.RSPAMC) or rspamd.RSPAMC
    sock = rspamd.learn_socket(cfg)
    for what in ("spam", "ham"):
        program = d / f"learn-{what}.sh"
        program.write_text(
            "#!/bin/sh\n# Generated by `mailroom run`: the message on standard input teaches rspamd "
            f"{what}.\nexec {rspamc} -h {sock} -t 30 learn_{what}\n"
        )
        program.chmod(0o700)
    (d / "report-spam.sieve").write_text(
        'require ["vnd.dovecot.pipe", "copy", "imapsieve"];\npipe :copy "learn-spam.sh";\n'
    )
    (d / "report-ham.sieve").write_text(
        'require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "variables"];\n'
        'if environment :matches "imap.mailbox" "*" { set "mailbox" "${1}"; }\n'
        'if string "${mailbox}" ["Trash", "Junk"] { stop; }\n'
        'pipe :copy "learn-ham.sh";\n'
    )
    return d

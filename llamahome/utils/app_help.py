"""``--help`` of the entry points, from one composition of the config.

Hydra's own ``--help`` lists every config group's options by deep-copying its config repository
once per group (about 130 copies here: 1.3 of the 1.5 s it takes). The groups LlamaHome ships
are directories of YAML files in ``llamahome/conf``, so listing one is a directory read. The
text is Hydra's: its ``hydra.help`` template, header and footer, the groups, the composed config
(overrides on the command line applied); only the groups listed are the ones this config uses.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from llamahome.utils.preflight import compose_config, group_options

__all__ = ["render_help"]


def render_help(config_name: str, overrides: Sequence[str], resolve: bool = False) -> str | None:
    """Hydra's app help for ``conf/<config_name>.yaml`` with ``overrides``.

    Args:
        config_name: The primary config (``train``, ``eval`` ...).
        overrides: The command line's overrides (shown applied in the config section).
        resolve: ``--resolve``: resolve interpolations in the config section.

    Returns:
        The help text, or ``None`` when the ``hydra.help`` template asks for what only Hydra
        renders (``$FLAGS_HELP``, ``$HYDRA_CONFIG_GROUPS``) or the config does not resolve:
        then Hydra's own ``--help`` runs.

    Raises:
        ConfigError: An override Hydra would refuse (see ``preflight.compose_config``).
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    cfg = compose_config(config_name, overrides)
    template = str(cfg.hydra.help.template)
    if "$FLAGS_HELP" in template or "$HYDRA_CONFIG_GROUPS" in template:
        return None
    groups = sorted(g for g in cfg.hydra.runtime.choices if not str(g).startswith("hydra"))
    listed = [f"{g}: {', '.join(options)}" for g in groups if (options := group_options(g))]
    try:
        if resolve:
            HydraConfig.instance().set_config(cfg)  # ${hydra:...} resolvers read it
        with open_dict(cfg):
            del cfg["hydra"]
        config = OmegaConf.to_yaml(cfg, resolve=resolve)
    except (OmegaConfBaseException, ValueError):
        return None
    return string.Template(template).safe_substitute(
        APP_CONFIG_GROUPS="".join(f"{line}\n" for line in listed), CONFIG=config
    )

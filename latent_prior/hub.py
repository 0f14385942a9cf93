"""The Hugging Face Hub: fetch a repo's files into the local cache, or push a folder, failing in one sentence.

    folder = download("user/my-prior", ("config.json", "model.safetensors"), what="prior")   # a local Path
    upload(folder, "user/my-prior", what="prior")

The local cache is tried first, so a cached repo loads with no network at all. When files are missing and
the Hub cannot be reached (HF_HUB_OFFLINE=1, or one probe request with no retries fails), we stop at once
with what to do, instead of waiting through huggingface_hub's retries. Every other Hub failure (no such repo,
a gated one, a missing revision or file) is one `LatentPriorError` sentence too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from latent_prior.errors import LatentPriorError

#: seconds the reachability probe waits for the Hub endpoint to answer
HUB_PROBE_TIMEOUT_S = 3.0


def offline_mode() -> bool:
    """HF_HUB_OFFLINE is set (read now, not when huggingface_hub was imported)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(env or constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One request, no retries: does the Hub endpoint answer at all (any HTTP status counts)?"""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # any failure to connect means "unreachable"; the caller's message says what to do
        return False
    return True


def is_repo_id(text: str) -> bool:
    """Whether `text` is a valid Hub repo id ("name" or "namespace/name")."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


class _NotCached(Exception):
    """Internal: a file is not in the local Hugging Face cache."""


def download(
    repo_id: str,
    filenames: Sequence[str],
    *,
    what: str,
    subfolder: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    token: str | bool | None = None,
) -> Path:
    """The local folder holding `filenames` of the Hub repo `repo_id` (in `subfolder`), from the cache when they
    are there (unless force_download), else downloaded. `what` names the thing in messages ("prior"). Raises
    LatentPriorError."""
    unusable = local_files_only or offline_mode()
    if force_download and not unusable:
        if not hub_reachable():
            raise LatentPriorError(
                f"{what} {repo_id!r}: force_download=True, but the Hub cannot be reached; drop "
                "force_download to use the cached copy, or try again when online."
            )
    else:
        try:
            return _fetch(repo_id, filenames, what, subfolder, revision, cache_dir, local_files_only=True)
        except _NotCached as missing:
            if unusable or not hub_reachable():
                raise LatentPriorError(
                    f"{what} {repo_id!r} is neither a local folder nor in the local Hugging Face cache ({missing}), and the "
                    f"Hub {'is not to be used (HF_HUB_OFFLINE / local_files_only)' if unusable else 'cannot be reached'}; "
                    f"download it while online (`hf download {repo_id}`) or pass the folder that holds it."
                ) from None
    return _fetch(
        repo_id, filenames, what, subfolder, revision, cache_dir, local_files_only=False, force_download=force_download, token=token
    )


def _fetch(
    repo_id: str,
    filenames: Sequence[str],
    what: str,
    subfolder: str | None,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    *,
    local_files_only: bool,
    force_download: bool = False,
    token: str | bool | None = None,
) -> Path:
    from huggingface_hub import errors, hf_hub_download

    folder: Path | None = None
    options = dict(subfolder=subfolder, revision=revision, cache_dir=cache_dir, force_download=force_download, token=token)
    for name in filenames:
        try:
            path = Path(hf_hub_download(repo_id, name, local_files_only=local_files_only, **options))
        except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as exc:
            if local_files_only:
                raise _NotCached(f"{name} is missing") from exc
            raise LatentPriorError(f"{what} {repo_id!r}: the connection to the Hub dropped while fetching {name}; try again.") from exc
        except errors.GatedRepoError as exc:  # a subclass of RepositoryNotFoundError, so first
            raise LatentPriorError(
                f"{what} {repo_id!r} is a gated Hub repo; accept its licence on huggingface.co and log in with `hf auth login`."
            ) from exc
        except errors.RepositoryNotFoundError as exc:
            raise LatentPriorError(
                f"{what} {repo_id!r} is neither a local folder nor a Hub repo; check the path or the id "
                "(a private repo needs `hf auth login`)."
            ) from exc
        except errors.RevisionNotFoundError as exc:
            raise LatentPriorError(f"{what} {repo_id!r} has no revision {revision!r}; check the revision.") from exc
        except errors.EntryNotFoundError as exc:
            where = f"{subfolder}/{name}" if subfolder else name
            raise LatentPriorError(
                f"Hub repo {repo_id!r} has no {where}; it does not hold a {what} there (pass subfolder= where it does)."
            ) from exc
        except errors.HfHubHTTPError as exc:
            raise LatentPriorError(
                f"the Hugging Face Hub answered an error for {what} {repo_id!r} ({str(exc).splitlines()[0]}); try again later."
            ) from exc
        folder = path.parent
    assert folder is not None, "download() needs at least one file name"
    return folder


def upload(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    what: str,
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    branch: str | None = None,
    create_pr: bool | None = None,
) -> str:
    """Create `repo_id` on the Hub if needed and upload the files of `folder` (to `branch`, or as a pull request);
    returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if offline_mode():
        raise LatentPriorError(
            f"push_to_hub: HF_HUB_OFFLINE is set, so {what} {repo_id!r} cannot be uploaded; unset it "
            f"and log in (`hf auth login`), or upload {folder} later with `hf upload {repo_id} {folder}`."
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            commit_message=commit_message or f"Upload {what}",
            revision=branch,
            create_pr=create_pr,
        )
    except OfflineModeIsEnabled as exc:
        raise LatentPriorError(f"push_to_hub: the Hub is offline; upload {folder} later with `hf upload {repo_id} {folder}`.") from exc
    except HfHubHTTPError as exc:
        raise LatentPriorError(
            f"push_to_hub: the Hub refused {repo_id!r} ({str(exc).splitlines()[0]}); check `hf auth login` and the repo id."
        ) from exc
    except OSError as exc:  # no connection
        raise LatentPriorError(
            f"push_to_hub: the Hub cannot be reached ({exc}); upload {folder} later with `hf upload {repo_id} {folder}`."
        ) from exc
    return str(getattr(info, "commit_url", info))

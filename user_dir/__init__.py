# fairseq's --user-dir / common.user_dir shim: importing the package registers every component.
import speechgpt_fairseq  # noqa: F401

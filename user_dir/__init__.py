# fairseq's --user-dir / common.user_dir shim: registers every component of speechgpt-fairseq.
import speechgpt_fairseq

speechgpt_fairseq.register()

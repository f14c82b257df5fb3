"""Privacy red team (issue 17): what an honest-but-curious server or a user of the released model learns.

One concept per module:

* :mod:`~fedguard.audit.image_metrics`: PSNR and SSIM (Wang et al. 2004), best match for batches;
* :mod:`~fedguard.audit.knowledge`: what the attacker knows, and the victim client producing what it sees;
* :mod:`~fedguard.audit.inversion`: gradient inversion, DLG/iDLG (Zhu et al. 2019; Zhao et al. 2020)
  and Inverting Gradients (Geiping et al. 2020);
* :mod:`~fedguard.audit.membership`: membership inference, loss threshold (Yeom et al. 2018) and
  offline LiRA (Carlini et al. 2022);
* :mod:`~fedguard.audit.roc`: AUC with a bootstrap interval, TPR at low FPR;
* :mod:`~fedguard.audit.canary`: the one-run DP audit (Steinke, Nasr, Jagielski 2023);
* :mod:`~fedguard.audit.pictures`: the reconstruction grid and the log-scale ROC plot;
* :mod:`~fedguard.audit.commands`: the ``fedguard audit`` subcommand.
"""

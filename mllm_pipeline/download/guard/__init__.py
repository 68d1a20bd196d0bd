"""The URL guard: every connection a downloader makes is checked against the URL policy.

* :mod:`.url_policy` — which URLs and addresses may be fetched (schemes, loopback / private / link-local / reserved
  ranges, the address forms that embed them);
* :mod:`.inline` — the guard inside img2dataset's own worker processes (:mod:`.img2dataset_hook` installs it): each
  connection is checked at the socket, redirects included, nothing is relayed;
* :mod:`.proxy` — the guard proxy for downloaders that run in their own environment (video2dataset, yt-dlp,
  ffmpeg) or on Spark executors, with :mod:`.tls_intercept` for HTTPS.
"""

"""Speech side: audio reading, MFCC features, k-means and unit formats. Never imports training code."""

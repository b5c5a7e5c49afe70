"""A floor for the synthetic AP: predict every validation figure's joints at the MEAN pose of 200 training figures
(in the GT box frame the data pipeline crops: aspect 3:4, x1.25), score OKS with COCO sigmas and the drawn-pixel
area, and approximate AP as the mean over thresholds 0.5:0.05:0.95 of the fraction of figures above (one figure per
image, GT boxes; not COCOeval). Usage: PYTHONPATH=. python meanpose_baseline.py easy|full
Measured 2026-12-01 (easy setting before its margin fix, 100 val figures): easy ~0.09, full ~0.004."""
import numpy as np, sys
from gtpt.synth import render_image
SIG = np.array([.26,.25,.25,.35,.35,.79,.79,.72,.72,.62,.62,1.07,1.07,.87,.87,.89,.89])/10
def norm(p):
    x,y,w,h = p["bbox"]; c = np.array([x+w/2,y+h/2])
    if w/h > 0.75: h = w/0.75
    else: w = h*0.75
    return c, np.array([w,h])*1.25
diff = sys.argv[1]
people=[]
for i in range(300):
    rng = np.random.default_rng([0,0,i]); _, ps, _ = render_image(rng, difficulty=diff); people += ps
K = []; 
for p in people:
    c,s = norm(p); kp = p["keypoints"]; K.append(((kp[:,:2]-c)/s, kp[:,2]))
tr, te = K[:200], K[200:]
num = sum(np.where(v[:,None]>0, n, 0) for n,v in tr); den = sum((v>0).astype(float) for n,v in tr)
mean = num/den[:,None]
ths = np.arange(0.5,0.96,0.05); oks=[]
for (n,v),p in zip(te, people[200:]):
    c,s = norm(p); d2 = (((mean-n)*s)**2).sum(1); vis=v>0
    e = d2/(2*p["area"]*(2*SIG)**2)
    oks.append(np.exp(-e)[vis].mean())
oks=np.array(oks); print(diff, "people", len(people), "mean-pose OKS median %.3f"%np.median(oks), "approx AP %.3f"%np.mean([(oks>t).mean() for t in ths]))

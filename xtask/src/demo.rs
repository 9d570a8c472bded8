//! `cargo xtask demo-data`: the embedded demo dataset, a synthetic data-to-text task in the
//! style of ADGEN. Sources are attribute lists (`类型#上衣*颜色#白色*风格#休闲`) with 2 to 5
//! attributes besides the type, in random order; targets are fluent Chinese ad sentences that
//! use every attribute. The target is a function of the source — each (type, attribute, value)
//! picks one of several phrasings, connectives follow the position, the closing follows the
//! type — so the task is learnable, while the number of combinations (10 types × 7 attributes
//! × 5–10 values × orders) means a model must copy values and compose phrases rather than
//! memorise templates. Deterministic.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use crate::corpus::Rng;

/// (key, values, phrasings; `{}` is the value).
const ATTRS: &[(&str, &[&str], &[&str])] = &[
    (
        "颜色",
        &[
            "白色",
            "黑色",
            "红色",
            "蓝色",
            "粉色",
            "绿色",
            "灰色",
            "卡其色",
            "米色",
            "紫色",
        ],
        &[
            "{}的配色干净大方",
            "选用{}作为主色调",
            "{}显得格外有气质",
            "一抹{}让人眼前一亮",
        ],
    ),
    (
        "材质",
        &[
            "棉",
            "牛仔布",
            "雪纺",
            "针织",
            "羊毛",
            "真丝",
            "亚麻",
            "灯芯绒",
        ],
        &[
            "采用{}面料，穿着舒适",
            "{}材质亲肤透气",
            "精选{}面料，手感柔软",
            "{}的质地更显质感",
        ],
    ),
    (
        "风格",
        &[
            "休闲", "简约", "通勤", "复古", "甜美", "街头", "文艺", "优雅",
        ],
        &[
            "整体是{}风格",
            "透露出{}的气息",
            "{}的设计很适合日常",
            "打造{}的造型",
        ],
    ),
    (
        "图案",
        &[
            "条纹", "格子", "纯色", "印花", "碎花", "刺绣", "波点", "字母",
        ],
        &[
            "{}图案增添了趣味",
            "点缀着{}元素",
            "经典的{}设计不过时",
            "{}的细节很有看点",
        ],
    ),
    (
        "版型",
        &["宽松", "修身", "直筒", "A字", "收腰"],
        &["{}的版型很显瘦", "{}剪裁修饰身形", "采用{}版型，包容性强"],
    ),
    (
        "领型",
        &["圆领", "尖领", "翻领", "立领", "方领"],
        &["{}设计修饰脸型", "搭配{}更显精神", "{}的领口简洁利落"],
    ),
    (
        "袖长",
        &["长袖", "短袖", "七分袖", "无袖", "五分袖"],
        &["{}的设计方便活动", "{}款式适合多个季节", "{}让整体更加利落"],
    ),
];

const TYPES: &[&str] = &[
    "上衣",
    "连衣裙",
    "半身裙",
    "裤子",
    "外套",
    "衬衫",
    "短袖衫",
    "卫衣",
    "毛衣",
    "风衣",
];
const OPENINGS: &[&str] = &["这款{}", "这件{}", "此款{}", "一款{}", "这条{}"];
const CONNECTIVES: &[&str] = &["，", "，同时", "，而且", "，并且", "，"];
const CLOSINGS: &[&str] = &[
    "。",
    "，日常穿搭很百搭。",
    "，是衣橱里的必备单品。",
    "，轻松穿出好气色。",
    "，上身效果很出彩。",
];

fn pick<'a>(rng: &mut Rng, xs: &[&'a str]) -> &'a str {
    xs[rng.below(xs.len() as u64) as usize]
}

/// One (source, target) pair.
pub fn example(rng: &mut Rng) -> (String, String) {
    let ty = pick(rng, TYPES);
    // 2..=5 attributes besides the type, in a random order.
    let mut idx: Vec<usize> = (0..ATTRS.len()).collect();
    for i in (1..idx.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        idx.swap(i, j);
    }
    let n = 2 + rng.below(4) as usize;
    let chosen: Vec<(usize, &str)> = idx[..n]
        .iter()
        .map(|&a| (a, pick(rng, ATTRS[a].1)))
        .collect();
    let mut src = format!("类型#{ty}");
    for (a, v) in &chosen {
        let _ = write!(src, "*{}#{}", ATTRS[*a].0, v);
    }
    // Everything below depends on the source only.
    let h = |parts: &[&str]| {
        parts.iter().fold(0xcbf2_9ce4_8422_2325u64, |acc, p| {
            p.bytes()
                .fold(acc, |a, b| (a ^ b as u64).wrapping_mul(0x0100_0000_01b3))
        })
    };
    let choose = |parts: &[&str], n: usize| (h(parts) % n as u64) as usize;
    let mut tgt = OPENINGS[choose(&[ty, "open"], OPENINGS.len())].replace("{}", ty);
    for (k, (a, v)) in chosen.iter().enumerate() {
        tgt.push_str(if k == 0 {
            "，"
        } else {
            CONNECTIVES[k % CONNECTIVES.len()]
        });
        let phrasings = ATTRS[*a].2;
        tgt.push_str(&phrasings[choose(&[ty, ATTRS[*a].0, v], phrasings.len())].replace("{}", v));
    }
    tgt.push_str(CLOSINGS[choose(&[ty, "close"], CLOSINGS.len())]);
    (src, tgt)
}

fn write_split(path: &Path, rng: &mut Rng, rows: usize) -> Result<()> {
    let mut out = String::new();
    for _ in 0..rows {
        let (src, tgt) = example(rng);
        out.push_str(&serde_json::json!({ "src": src, "tgt": tgt }).to_string());
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| path.display().to_string())
}

pub fn run(_args: &[String]) -> Result<()> {
    let dir = Path::new("datasets/demo");
    std::fs::create_dir_all(dir)?;
    let mut rng = Rng::new(20_201_116);
    write_split(&dir.join("train.jsonl"), &mut rng, 12_000)?;
    write_split(&dir.join("valid.jsonl"), &mut rng, 300)?;
    write_split(&dir.join("test.jsonl"), &mut rng, 300)?;
    println!("wrote datasets/demo/{{train,valid,test}}.jsonl (12000/300/300 rows)");
    Ok(())
}
